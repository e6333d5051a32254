# A small TopK LM on the synthetic toy corpus (python prepare.py --dataset=toy).
# Trains on a laptop CPU in minutes:  python train.py config/train_toy.py
# Its dense twin:                     python train.py config/train_toy.py --topk=0 --out_dir=out-toy-dense
out_dir = 'out-toy'
data_dir = 'data/toy'
eval_interval = 100
eval_iters = 20
log_interval = 25
ckpt_interval = 25  # a dense series of checkpoints (17 x 29 MB) to watch neurons form while alpha anneals

batch_size = 8  # 1,024 tokens per step: the 50k-vocabulary softmax is most of a step's time
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
topk = 16  # of d_ff = 512 neurons; the paper's 64 of 4096 is sparser still
n_nontopk = 1

learning_rate = 2e-3  # small models take a large learning rate
max_iters = 400
lr_decay_iters = 400
min_lr = 2e-4
warmup_iters = 30
weight_decay = 0.1
beta2 = 0.99  # few tokens per step: a longer second-moment average is steadier

device = 'cpu'
compile = False
