"""
Train a TopK LM (or, with --topk=0, its dense GPT-2 twin).

One process:    python train.py config/train_toy.py --max_iters=500
Several GPUs:   torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_edu.py
See every key:  python train.py --help
"""
import glob
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import at_least, configure, die
from model import GPT, GPTConfig, SCHEDULES, annealed_alpha, annealing_span
from toolkit.common import autocast, device_facts, keep_freed_memory, peak_flops, resolve_device, resolve_dtype, save_checkpoint
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import VOCAB_SIZE, load_splits
from toolkit.pretrained import SHAPE, start_from

# -----------------------------------------------------------------------------
# default config values: a FineWeb-Edu TopK LM of GPT-2 small size
# I/O
out_dir = 'out'  # checkpoints go here
data_dir = 'data/fineweb-edu'  # token shards written by prepare.py
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), 'auto' (resume if out_dir has a ckpt.pt), or weights to TopK-ify: gpt2[-medium|-large|-xl], a transformers GPT-2 folder, a ckpt.pt
overwrite = False  # a new run (from scratch or from weights) replaces the run already in out_dir instead of refusing
eval_interval = 1000  # evaluate and save ckpt.pt every this many iterations
eval_iters = 100  # batches per evaluation (always the same tokens)
log_interval = 10  # print a log line every this many iterations
ckpt_interval = 1000  # keep ckpt_{iter}.pt every this many iterations, for formation analysis; 0 = never
stop_iter = -1  # stop (and save) at this iteration without changing the schedule; -1 = at max_iters
seed = 1337  # model init, data order and dropout all follow from it
# data
batch_size = 16  # micro-batch size (sequences)
block_size = 1024  # context length
gradient_accumulation_steps = 32  # micro-batches per optimizer step, over all processes
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True  # biases in Linears and LayerNorms
topk = 64  # k active MLP neurons per token in TopK blocks; 0 = dense baseline
n_nontopk = 2  # the last n_nontopk blocks keep the dense GELU MLP
annealing_ratio = 0.2  # alpha goes 1 -> 0 over this fraction of max_iters
annealing_schedule = 'linear'  # alpha's path: 'linear' (the paper's), 'cosine', or 'step' (TopK from iteration 0)
# AdamW
learning_rate = 6e-4  # peak learning rate
max_iters = 20000  # total optimizer steps
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm; 0 = off
# learning-rate schedule: linear warmup, cosine decay to min_lr
warmup_iters = 700
lr_decay_iters = 20000  # usually = max_iters
min_lr = 6e-5  # usually learning_rate / 10
# system
backend = 'auto'  # DDP backend: 'auto' = nccl on CUDA, gloo on CPU
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 on GPUs that compute in it natively, float16 + loss scaling on older ones, float32 on CPU), 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile the model where it pays (CUDA; toolkit/common.py's DEVICES says why not elsewhere)
cpu_fast = True  # on a CPU, toolkit/cpu_fast.py's sparse TopK MLP and chunked loss (model.py's numbers, faster); False: model.py's code
# -----------------------------------------------------------------------------
given = set()  # the keys a config file or flag set: the others may come from --init_from's weights
config = configure(globals(), given=given)
at_least(1, eval_interval=eval_interval, eval_iters=eval_iters, log_interval=log_interval, batch_size=batch_size,
         gradient_accumulation_steps=gradient_accumulation_steps)
at_least(0, max_iters=max_iters, seed=seed, learning_rate=learning_rate, min_lr=min_lr)
if not 0 <= annealing_ratio <= 1:  # above 1 alpha never reaches 0: the model would never be trained sparse
    die(f"--annealing_ratio must be between 0 and 1, got {annealing_ratio}")
for flag, v in (('beta1', beta1), ('beta2', beta2)):
    if not 0 <= v < 1:
        die(f"--{flag} must be at least 0 and below 1, got {v}")
if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # found now, not at the first save
    die(f"--out_dir={out_dir} is a file, not a folder")

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK; every process runs this same script
ddp = int(os.environ.get('RANK', -1)) != -1
device = resolve_device(device)
if ddp:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend=('nccl' if device.startswith('cuda') else 'gloo') if backend == 'auto' else backend)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
restartable = int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) > 0
if master and restartable and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
    # a restarted job can read stale addresses from the store torchrun shares with it, and fail to connect
    print("warning: torchrun --max_restarts restarts reliably only with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
          "set for torchrun (README, Reliability)", flush=True)
if gradient_accumulation_steps % world_size:
    die(f"--gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the {world_size} processes")
accum_per_rank = gradient_accumulation_steps // world_size
dtype = resolve_dtype(dtype, device)
device_type, facts = device.split(':')[0], device_facts(device)  # what this kind of device takes (toolkit/common.py)
ctx = autocast(device, dtype)
torch.manual_seed(seed)  # the same initial weights in every process
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
elif device_type == 'cpu':
    keep_freed_memory()  # large freed buffers are reused, not mapped and zeroed anew every step (toolkit/common.py)

# -----------------------------------------------------------------------------
# data: memory-mapped shards (read below, once the run's vocabulary is known); every batch is a
# pure function of (seed, iteration, micro-batch), so a resumed run and a run over any number of
# processes see exactly the same tokens


def batch_at(split, starts):
    """Sequences starting at the given (shard, offset) pairs: inputs x and next-token targets y."""
    rows = [torch.from_numpy(splits[split][s][o:o + block_size + 1].astype(np.int64)) for s, o in starts]
    xy = torch.stack(rows)
    # on CUDA one copy, from pinned memory, that overlaps with compute; x and y are views of it
    xy = xy.pin_memory().to(device, non_blocking=True) if facts['pin_memory'] else xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def random_starts(split, rng, n):
    shards = splits[split]
    positions = np.array([max(len(t) - block_size, 0) for t in shards])  # where a block_size + 1 window fits
    which = rng.choice(len(shards), size=n, p=positions / positions.sum())  # uniform over all positions
    return [(s, int(rng.integers(0, positions[s]))) for s in which]


def get_batch(it, micro):
    """Training micro-batch number `micro` (0 .. gradient_accumulation_steps-1) of iteration it.
    It also reseeds torch's generator, so that dropout on this micro-batch, like its tokens, follows
    from (seed, it, micro) alone: a resumed run needs no saved RNG state, and two processes with one
    micro-batch each draw the same dropout masks as one process with two, bit for bit."""
    rng = np.random.default_rng([seed, it, micro])
    torch.manual_seed(int(rng.integers(2**63)))
    return batch_at('train', random_starts('train', rng, batch_size))


@torch.no_grad()
def estimate_loss():
    """Mean loss on fixed positions: the same eval_iters batches at every evaluation, shared among
    the processes (batch i on rank i % world_size). Losses add up on the device, and one all_reduce
    and one read-back per evaluation replace a sync per batch."""
    sums = torch.zeros(2, device=device)
    eval_model.eval()
    for n, split in enumerate(('train', 'val')):
        starts = random_starts(split, np.random.default_rng([seed, 2**31 - 1]), eval_iters * batch_size)
        for i in range(rank, eval_iters, world_size):
            with ctx:
                _, loss = eval_model(*batch_at(split, starts[i * batch_size:(i + 1) * batch_size]))
            sums[n] += loss.float()
    eval_model.train()
    if ddp:
        dist.all_reduce(sums)
    train_loss, val_loss = (sums / eval_iters).tolist()
    return {'train': train_loss, 'val': val_loss}


# -----------------------------------------------------------------------------
# model and optimizer: from scratch, from out_dir/ckpt.pt, or from trained weights (toolkit/pretrained.py)
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=VOCAB_SIZE, dropout=dropout, topk=topk, n_nontopk=n_nontopk)
if annealing_schedule not in SCHEDULES:
    die(f"--annealing_schedule must be one of {', '.join(SCHEDULES)}, got {annealing_schedule!r}")
init_from, checkpoint, weights, model_args = start_from(init_from, out_dir, overwrite, model_args, config, given)
if master and checkpoint is None and weights is not None:
    print(f"the shape of the weights in {init_from}: " + ", ".join(f"{k} {model_args[k]}" for k in SHAPE + ('block_size',)))
config.update((k, model_args[k]) for k in config.keys() & model_args.keys())  # as the model is, in every checkpoint
block_size = model_args['block_size']
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master:
    print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} x {batch_size} x {block_size})")
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
iter_num, best_val_loss = 0, 1e9
# alpha's path is fixed when a run starts: 0 from iteration anneal_span on, which a resumed run keeps,
# so extending a run (a larger --max_iters) never takes a sparse model back towards dense
anneal_span = annealing_ratio * max_iters
if checkpoint is not None:
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    anneal_span = annealing_span(checkpoint)
splits = load_splits(data_dir, model_args['vocab_size'], block_size)  # other weights may have fewer tokens
try:
    model = GPT(GPTConfig(**model_args))
except ValueError as e:
    die(str(e))
if checkpoint is not None or weights is not None:
    try:
        model.load_state_dict(checkpoint['model'] if checkpoint is not None else weights)
    except RuntimeError as e:  # e.g. a folder whose config.json does not match its weights
        die(f"the weights of {ckpt_path if checkpoint is not None else init_from} do not fit the model: "
            f"{' '.join(str(e).split())[:200]}")
    weights = None  # free memory: the model holds its own copy
model.to(device)
if cpu_fast:  # a model off the CPU is left as it is
    cpu_fast_paths(model)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))  # bf16 and fp32 need no loss scaling
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), facts['fused_adamw'])
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    checkpoint = None  # free memory
raw_model = model
if compile and facts['compile']:
    model = torch.compile(model)
eval_model = model  # every rank evaluates its share of the batches, outside DDP's gradient hooks
if ddp:  # alpha, the one buffer, is broadcast from rank 0 at each forward: one scalar, the same on every rank
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def get_lr(it):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(lr_decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save(path, full):
    """ckpt.pt holds what resuming needs; the ckpt_{iter}.pt series only the model."""
    ckpt = {'model': raw_model.state_dict(), 'model_args': model_args, 'iter_num': iter_num, 'config': config,
            'anneal_span': anneal_span}
    if full:
        ckpt.update(optimizer=optimizer.state_dict(), best_val_loss=best_val_loss)
    save_checkpoint(ckpt, path)


# -----------------------------------------------------------------------------
# training loop
end_iter = max_iters if stop_iter < 0 else min(stop_iter, max_iters)
flops_per_iter = raw_model.flops_per_token() * tokens_per_iter  # over all processes: MFU divides by all their GPUs
peak = peak_flops(device)
start_iter, t0 = iter_num, time.time()
if master:  # a run killed while saving leaves its temporary file (toolkit/common.py's atomic_write) behind
    for stale in glob.glob(os.path.join(out_dir, '.tmp_ckpt*')):
        os.remove(stale)
    if init_from != 'resume' and overwrite:  # the replaced run's snapshots would mix into this one's series
        for stale in glob.glob(os.path.join(out_dir, 'ckpt*.pt')):
            os.remove(stale)
# The NaN guarantee without a host sync per step: every step ANDs its loss's finiteness into a flag
# on the device, read only where the loop reads the device anyway (logging) or is about to write a
# model (evaluation, snapshots), so no model is saved once a loss was nan or inf.
all_finite, unchecked_from = torch.ones((), dtype=torch.bool, device=device), iter_num


def stop_if_diverged(last):
    """Stop if a loss of iterations unchecked_from..last was not finite."""
    global unchecked_from
    if ddp:  # every rank stops, not only the one that saw it
        flag = all_finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        all_finite.copy_(flag.bool())
    if not all_finite.item():
        where = f"iteration {last}" if last == unchecked_from else f"one of iterations {unchecked_from}-{last}"
        die(f"the loss was nan or inf at {where}; stopping without saving (lower --learning_rate "
            f"or check the data). The last good checkpoint is in {out_dir}")
    unchecked_from = last + 1


while True:
    lr, alpha = get_lr(iter_num), annealed_alpha(iter_num, anneal_span, annealing_schedule)
    for group in optimizer.param_groups:
        group['lr'] = lr
    raw_model.set_alpha(alpha)

    resumed_here = init_from == 'resume' and iter_num == start_iter  # this state is already on disk
    if iter_num % eval_interval == 0 and not resumed_here and iter_num > 0 or iter_num == end_iter:
        t_eval = time.time()
        stop_if_diverged(iter_num - 1)
        losses = estimate_loss()
        if not math.isfinite(losses['val']):
            die(f"validation loss is {losses['val']} at iteration {iter_num}; "
                f"not saving over the last good checkpoint in {out_dir}")
        best_val_loss = min(best_val_loss, losses['val'])
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                  f"val ppl {math.exp(losses['val']):.2f}", flush=True)
            save(ckpt_path, full=True)
        t0 += time.time() - t_eval  # tokens/s counts training time only
    snapshot = os.path.join(out_dir, f'ckpt_{iter_num:06d}.pt')
    # a run stopped between writing ckpt.pt and this snapshot resumes at this state: write it then
    snapshot_due = (ckpt_interval > 0 and iter_num % ckpt_interval == 0
                    and not (resumed_here and os.path.exists(snapshot)))
    if iter_num >= end_iter:
        if snapshot_due and master:
            save(snapshot, full=False)
        break

    loss_sum = torch.zeros((), device=device)  # this rank's share of the iteration's loss
    for micro in range(accum_per_rank):
        x, y = get_batch(iter_num, rank * accum_per_rank + micro)  # reseeds dropout too
        if ddp:  # average gradients across processes only on the last micro-batch
            model.require_backward_grad_sync = micro == accum_per_rank - 1
        with ctx:
            _, loss = model(x, y, return_logits=False)  # no (tokens, vocabulary) logits to keep
            loss = loss / accum_per_rank  # DDP averages over processes, completing the mean
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    all_finite &= torch.isfinite(loss_sum)
    if snapshot_due:  # this model, before the step changes it, and only once its loss is known to be finite
        stop_if_diverged(iter_num)  # on every rank: a collective under DDP
        if master:
            save(snapshot, full=False)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    iter_num += 1
    if iter_num % log_interval == 0:
        if ddp:  # the loss over the whole global batch, as one process would see it
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        stop_if_diverged(iter_num - 1)
    if master and iter_num % log_interval == 0:
        dt, t0 = time.time() - t0, time.time()
        line = (f"iter {iter_num}: loss {loss_sum.item():.6f}, lr {lr:.3e}, alpha {alpha:.3f}, "
                f"{tokens_per_iter * log_interval / dt:,.0f} tok/s")
        if peak:
            line += f", mfu {100 * flops_per_iter * log_interval / dt / (peak * world_size):.1f}%"
        print(line, flush=True)

if ddp:
    dist.barrier()  # the master's last save is done
    dist.destroy_process_group()
    # DDP leaves references to the process group in C++ that outlive it, so gloo's worker and socket
    # threads outlive destroy_process_group; one that needs the GIL while Python finalizes is ended by
    # pthread_exit, whose unwinding aborts ("terminate called without an active exception"). Everything
    # is written and flushed: leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
