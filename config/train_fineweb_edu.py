# The paper's setting (Takahashi et al. 2025): an 8-layer, 1024-wide TopK LM, k = 64 of
# d_ff = 4096, the last 2 blocks dense, context 1024, on ~20B FineWeb-Edu tokens.
# One GPU:     python train.py config/train_fineweb_edu.py
# 8 GPUs:      torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_edu.py
# Dense twin:  add --topk=0 --out_dir=out-fineweb-edu-dense
out_dir = 'out-fineweb-edu'
data_dir = 'data/fineweb-edu'
eval_interval = 1000
eval_iters = 200
log_interval = 10
ckpt_interval = 2000  # for tracing neuron formation: 20 snapshots (iterations 0, 2000, ..., 38000) of ~610 MB each (the model alone, fp32), ~12.2 GB

# 16 x 1024 tokens x 32 micro-steps = 524,288 tokens per step; 38,000 steps ~ 20B tokens
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

n_layer = 8
n_head = 16
n_embd = 1024
topk = 64
n_nontopk = 2
annealing_ratio = 0.2

learning_rate = 6e-4
max_iters = 38000
lr_decay_iters = 38000
min_lr = 6e-5
warmup_iters = 700
