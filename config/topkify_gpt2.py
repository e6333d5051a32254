# TopK-ify OpenAI's GPT-2 small on FineWeb-Edu: its weights, k = 64 of d_ff = 3072 in the first 10
# of its 12 blocks (the last 2 dense, as the paper's), annealed from dense over the first 20% of
# 2,000 steps of 524,288 tokens (about 1B tokens, 5% of the paper's from-scratch budget).
# A GPU recipe, not measured here (RESULTS.md, TopK-ification, has the CPU-scale measurement):
#   python prepare.py                                                       # FineWeb-Edu into data/fineweb-edu
#   torchrun --standalone --nproc_per_node=8 train.py config/topkify_gpt2.py
# GPT-2 medium, large, xl: add --init_from=gpt2-medium (the run takes the weights' shape and prints it).
init_from = 'gpt2'
out_dir = 'out-gpt2-topk'
data_dir = 'data/fineweb-edu'
eval_interval = 250
eval_iters = 200
log_interval = 10
ckpt_interval = 250

batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

# the shape (n_layer, n_head, n_embd, bias) is the weights'
topk = 64
n_nontopk = 2
annealing_ratio = 0.2

# a fresh optimizer and schedule; a lower peak than pretraining's 6e-4, for weights already trained
learning_rate = 3e-4
max_iters = 2000
lr_decay_iters = 2000
min_lr = 3e-5
warmup_iters = 100
