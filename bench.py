"""
What TopK costs, and what its sparsity saves: the dense model (topk=0) and the TopK model of
the same shape, measured side by side in one process.

    python bench.py                  # CPU defaults: a 6-layer, 384-wide model (a few minutes on 2 cores)
    python bench.py --preset=gpt2    # GPT-2 small shapes for a GPU (bf16 autocast, torch.compile)

It prints a table; its last line is one JSON object with the ratios, for scripts. Variants are
timed in turns and reported as medians, so load from other processes falls on all of them alike.
"""
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa  # installed with datasets
import pyarrow.parquet as pq
import torch
from torch.profiler import ProfilerActivity, profile

import common
import prepare
import sparse_mlp
from configurator import configure, die
from model import GPT, MLP, GPTConfig

# -----------------------------------------------------------------------------
preset = ""  # 'gpt2': GPT-2 small shapes for a GPU; explicit flags still override it
device = "auto"  # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'
dtype = "auto"  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile the training models (used on CUDA only, as train.py)
seed = 1337  # weights, inputs and prompts all follow from it
# the training model (TopK and its dense twin)
n_layer = 6  # transformer blocks
n_head = 6  # attention heads
n_embd = 384  # width; d_ff = 4 * n_embd
block_size = 256  # tokens per training sequence
batch_size = 8  # sequences per training iteration
topk = 64  # k of the TopK model
n_nontopk = 2  # the last n_nontopk blocks of the TopK model are dense
anneal_alpha = 0.5  # alpha of the annealing-phase measurement (0 < alpha < 1: the dense TopK formula)
train_iters = 6  # timed training iterations of each model
warmup_iters = 2  # untimed iterations first (allocations, compilation)
# the MLP alone
mlp_tokens = 4096  # tokens per MLP forward+backward
mlp_iters = 9  # timed repetitions
# decoding with and without KV cache (the training model's shape, block_size >= prompt + new)
decode_prompt = 256  # prompt tokens
decode_new = 256  # generated tokens (greedy)
# batch-1 decoding, dense vs sparse down-projection, on a larger model
sparse_n_layer = 12  # blocks of the decoding model (GPT-2 small shape)
sparse_n_head = 12  # its attention heads
sparse_n_embd = 768  # its width
sparse_prompt = 64  # prompt tokens (dense vs sparse c_proj)
sparse_new = 128  # generated tokens (greedy, dense vs sparse c_proj)
decode_repeats = 3  # timed generations without and with KV cache
sparse_repeats = 7  # timed generations with dense and sparse c_proj (a smaller gain: more rounds)
# prepare.py's tokenizer
prepare_input = ""  # a .parquet of documents (column 'text'), e.g. a FineWeb-Edu file, repeated as needed; '' = skip
prepare_tokens = 4_000_000  # tokens to tokenize and write as a shard; 0 = skip
# -----------------------------------------------------------------------------
GPT2_PRESET = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, mlp_tokens=16384)


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def race(fns, repeats, warmup=1):
    """Seconds of each of fns {name: fn} in every round; within a round they run in turns."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio(times, a, b):
    """a's time over b's, the median over rounds of the ratio within each round: the runs of a
    round are seconds apart, so a machine that speeds up or slows down between rounds (other
    tenants of a shared host take memory bandwidth) does not shift the ratio."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C++ log lines (start, stop, a note on blocks allocated before it)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn):
    """Bytes allocated at the high point of fn() beyond what was allocated when it began. For a
    training step that is activations, gradients and temporaries, not the weights and optimizer
    state that persist between steps. CUDA: the allocator's own statistics. CPU: PyTorch keeps
    none, so the profiler's record of every allocation (with its running total) is read back."""
    if device.startswith("cuda"):
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(device) - base
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, "trace.json"))
        with open(os.path.join(d, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"]["Device Type"] == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - base


def saved_for_backward(model, x, y, ctx):
    """Bytes of the tensors autograd keeps from the forward for the backward (each storage once),
    the weights excluded: the activation memory that TopK's sparse path is meant to shrink."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(x, y, return_logits=False)
    return sum(storages.values())


def bench_training(ctx, use_compile):
    """Training iterations of the dense model and of the TopK model at alpha = 0 and in annealing."""
    B, T = batch_size, block_size
    shape = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, n_nontopk=n_nontopk)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(common.VOCAB_SIZE, (B, T), generator=gen).to(device)
    y = torch.randint(common.VOCAB_SIZE, (B, T), generator=gen).to(device)
    runs = {}
    for name, k in (("dense", 0), ("topk", topk)):
        torch.manual_seed(seed)  # the same initial weights for both
        model = GPT(GPTConfig(**shape, topk=k)).to(device)
        opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.split(":")[0])
        runs[name] = (model, torch.compile(model) if use_compile else model, opt)
    variants = {"dense": ("dense", 0.0), "topk": ("topk", 0.0), "anneal": ("topk", anneal_alpha)}

    def step(variant):
        model, fwd, opt = runs[variants[variant][0]]
        model.set_alpha(variants[variant][1])
        with ctx:
            _, loss = fwd(x, y, return_logits=False)  # as train.py
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = race({v: (lambda v=v: step(v)) for v in variants}, train_iters, warmup_iters)
    results = {}
    for v in variants:
        model = runs[variants[v][0]][0]
        model.set_alpha(variants[v][1])
        seconds = statistics.median(times[v])
        results[v] = dict(seconds=seconds, tokens_per_s=B * T / seconds, vs_dense=ratio(times, v, "dense"),
                          peak=peak_memory(lambda v=v: step(v)),
                          saved=saved_for_backward(model, x, y, ctx))
        peak = common.peak_flops(device)
        if peak:  # dense-equivalent FLOPs, so the TopK model's MFU is comparable to its twin's
            results[v]["mfu"] = model.flops_per_token() * results[v]["tokens_per_s"] / peak
    return results


def bench_mlp(ctx):
    """Forward+backward of one MLP: dense GELU, TopK on the sparse path, TopK on the reference."""
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=n_embd, topk=topk, n_nontopk=0)
    torch.manual_seed(seed)
    dense = MLP(cfg, 0).to(device)
    torch.manual_seed(seed)
    sparse = MLP(cfg, topk).to(device)
    h = torch.randn(1, mlp_tokens, n_embd, device=device, requires_grad=True)
    g = torch.randn(1, mlp_tokens, n_embd, device=device)

    def fwd_bwd(mlp, fast):
        with sparse_mlp.switched(fast), ctx:
            out = mlp(h)
        out.backward(g.to(out.dtype))

    fns = {"dense": lambda: fwd_bwd(dense, True), "topk": lambda: fwd_bwd(sparse, True),
           "reference": lambda: fwd_bwd(sparse, False)}
    times = race(fns, mlp_iters)
    return {v: dict(seconds=statistics.median(times[v]), vs_dense=ratio(times, v, "dense"), peak=peak_memory(fn))
            for v, fn in fns.items()}


def generate(model, prompt, new, ctx, use_cache=True, fast=True, transposed_fc=True):
    with sparse_mlp.switched(fast, transposed_fc), ctx:
        return model.generate(prompt, new, temperature=0, use_cache=use_cache)


def bench_decoding(ctx):
    """Greedy batch-1 generation: without and with KV cache on the training shape; then dense vs
    sparse down-projection (both with KV cache) on a larger model."""
    results = {}
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, topk=topk, n_nontopk=n_nontopk,
                    block_size=max(block_size, decode_prompt + decode_new))
    model = GPT(cfg).to(device).eval()
    prompt = torch.randint(common.VOCAB_SIZE, (1, decode_prompt), device=device)
    out = {}

    def run(name, **kw):
        out[name] = generate(model, prompt, decode_new, ctx, **kw)

    t = race({"nocache": lambda: run("nocache", use_cache=False), "cache": lambda: run("cache")},
             decode_repeats)
    results["nocache"] = dict(tokens_per_s=decode_new / statistics.median(t["nocache"]))
    results["cache"] = dict(tokens_per_s=decode_new / statistics.median(t["cache"]), speedup=ratio(t, "nocache", "cache"),
                            same=torch.equal(out["nocache"], out["cache"]))
    del model

    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=sparse_n_layer, n_head=sparse_n_head, n_embd=sparse_n_embd, topk=topk,
                    n_nontopk=n_nontopk, block_size=sparse_prompt + sparse_new)
    model = GPT(cfg).to(device).eval()
    prompt = torch.randint(common.VOCAB_SIZE, (1, sparse_prompt), device=device)

    def run_large(name, fast, transposed_fc=True):
        out[name] = generate(model, prompt, sparse_new, ctx, fast=fast, transposed_fc=transposed_fc)

    t = race({"dense": lambda: run_large("dense", False), "sparse": lambda: run_large("sparse", True),
              "proj_only": lambda: run_large("proj_only", True, transposed_fc=False)}, sparse_repeats)
    with torch.no_grad(), ctx:  # the logits of every position of the whole generated sequence
        seq = out["dense"][:, :cfg.block_size]
        logits = []
        for fast in (False, True):
            with sparse_mlp.switched(fast):
                logits.append(model(seq, seq)[0].float())  # targets only to get every position's logits
    results["dense_proj"] = dict(tokens_per_s=sparse_new / statistics.median(t["dense"]))
    results["proj_only"] = dict(tokens_per_s=sparse_new / statistics.median(t["proj_only"]),
                                speedup=ratio(t, "dense", "proj_only"), same=torch.equal(out["dense"], out["proj_only"]))
    results["sparse_proj"] = dict(tokens_per_s=sparse_new / statistics.median(t["sparse"]), speedup=ratio(t, "dense", "sparse"),
                                  same=torch.equal(out["dense"], out["sparse"]),
                                  max_abs_diff=(logits[0] - logits[1]).abs().max().item())
    return results


def bench_prepare():
    """prepare.py itself, run as a user runs it, on real FineWeb-Edu text repeated to about
    prepare_tokens tokens: reading, tokenizing and shard writing, as prepare.py times them."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = prepare_input  # as the user gave it, relative to the working directory
    if not os.path.isfile(path):
        die(f"--prepare_input {path} not found (without it, this measurement is skipped)")
    docs = pq.read_table(path, columns=["text"]).column(0).to_pylist()
    repeats = math.ceil(prepare_tokens / len(prepare.tokenize_documents(docs)))
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(pa.table({"text": docs * repeats}), os.path.join(d, "docs.parquet"))
        run = subprocess.run([sys.executable, os.path.join(here, "prepare.py"), f"--input={d}/docs.parquet",
                              f"--out_dir={d}/shards", f"--val_tokens={prepare_tokens // 20 + 1}"],
                             capture_output=True, text=True)
    if run.returncode:
        die(f"prepare.py failed: {run.stderr.strip().splitlines()[-1]}")
    tokens, rate = re.search(r"^wrote ([\d,]+) tokens .*: ([\d.]+)M tokens/s", run.stdout, re.M).groups()
    return dict(tokens=int(tokens.replace(",", "")), tokens_per_s=float(rate) * 1e6)


def mib(n):
    return f"{n / 2**20:9.1f}"


def print_training(tr):
    print(f"\ntraining iteration   {'ms':>9} {'tokens/s':>9} {'vs dense':>8} {'peak MiB':>9} "
          f"{'saved MiB':>9}" + (f" {'MFU':>6}" if "mfu" in tr["dense"] else ""))
    labels = {"dense": "dense (topk=0)", "topk": "TopK, alpha=0", "anneal": f"TopK, alpha={anneal_alpha}"}
    for v, r in tr.items():
        print(f"  {labels[v]:<18} {1e3 * r['seconds']:9.1f} {r['tokens_per_s']:9.0f} "
              f"{r['vs_dense']:8.2f} {mib(r['peak'])} {mib(r['saved'])}"
              + (f" {100 * r['mfu']:5.1f}%" if "mfu" in r else ""))
    print("  peak: allocated during one step beyond weights and optimizer state; "
          "saved: activations kept for the backward")


def print_mlp(mlp):
    print(f"\nMLP forward+backward, {mlp_tokens} tokens {'ms':>9} {'vs dense':>8} {'peak MiB':>9}")
    for v, label in (("dense", "dense GELU"), ("topk", "TopK, sparse path"), ("reference", "TopK, reference")):
        print(f"  {label:<31} {1e3 * mlp[v]['seconds']:9.1f} "
              f"{mlp[v]['vs_dense']:8.2f} {mib(mlp[v]['peak'])}")


def print_decoding(dec):
    small = f"{n_layer}x{n_embd}, {decode_prompt} prompt + {decode_new} new"
    large = f"{sparse_n_layer}x{sparse_n_embd}, {sparse_prompt} prompt + {sparse_new} new"
    rows = [(f"{small}, no cache", dec["nocache"]), (f"{small}, KV cache", dec["cache"]),
            (f"{large}, KV cache, dense c_proj", dec["dense_proj"]),
            (f"{large}, KV cache, sparse c_proj", dec["proj_only"]),
            (f"{large}, KV cache, sparse c_proj + W_fc^T", dec["sparse_proj"])]
    print(f"\ndecoding, batch 1, greedy {' ' * 31} {'tokens/s':>8} {'speedup':>8}")
    for label, r in rows:
        print(f"  {label:<54} {r['tokens_per_s']:8.1f}" + (
            f" {r['speedup']:8.2f}  same tokens: {r['same']}" if "speedup" in r else ""))
    print(f"  sparse vs dense c_proj, max |logit difference|: {dec['sparse_proj']['max_abs_diff']:.1e}")


def summary(tr, mlp, dec, prep):
    """The ratios and rates of every table, for scripts (the last output line, as JSON)."""
    return dict(
        device=device if device == "cpu" else torch.cuda.get_device_name(device), dtype=dtype,
        train_topk_over_dense=tr["topk"]["vs_dense"],
        anneal_over_dense=tr["anneal"]["vs_dense"],
        peak_mem_topk_over_dense=tr["topk"]["peak"] / tr["dense"]["peak"],
        saved_mem_topk_over_dense=tr["topk"]["saved"] / tr["dense"]["saved"],
        mlp_topk_over_dense=mlp["topk"]["vs_dense"],
        mlp_reference_over_dense=mlp["reference"]["vs_dense"],
        mlp_peak_mem_topk_over_dense=mlp["topk"]["peak"] / mlp["dense"]["peak"],
        kv_cache_speedup=dec["cache"]["speedup"],
        kv_cache_same_tokens=dec["cache"]["same"],
        sparse_decode_speedup=dec["sparse_proj"]["speedup"],
        sparse_proj_only_decode_speedup=dec["proj_only"]["speedup"],
        sparse_decode_same_tokens=dec["sparse_proj"]["same"],
        sparse_decode_max_abs_diff=dec["sparse_proj"]["max_abs_diff"],
        prepare_tokens_per_s=prep["tokens_per_s"] if prep else None,
        **{f"train_tokens_per_s_{v}": r["tokens_per_s"] for v, r in tr.items()},
        **{f"peak_mib_{v}": r["peak"] / 2**20 for v, r in tr.items()},
        **{f"mfu_{v}": r["mfu"] for v, r in tr.items() if "mfu" in r},
        **{f"decode_tokens_per_s_{v}": r["tokens_per_s"] for v, r in dec.items()},
    )


def main():
    global device, dtype
    configure(globals())
    if preset == "gpt2":
        globals().update(GPT2_PRESET)
        configure(globals())  # once more, so that explicit flags win over the preset
    elif preset:
        die(f"--preset must be '' or 'gpt2', got {preset!r}")
    if not 0 < anneal_alpha < 1:
        die(f"--anneal_alpha must be strictly between 0 and 1, got {anneal_alpha}")
    device = common.resolve_device(device)
    dtype = common.resolve_dtype(dtype, device)
    ctx = common.autocast(device, dtype)
    use_compile = compile and device.startswith("cuda")
    if device == "cpu":
        common.keep_freed_memory()  # as train.py does
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    print(f"device {device}{threads}, {dtype}, torch.compile {'on' if use_compile else 'off'}, torch {torch.__version__}")
    print(f"model: n_layer {n_layer}, n_embd {n_embd}, d_ff {4 * n_embd}, block_size {block_size}, "
          f"batch_size {batch_size}, k {topk}, n_nontopk {n_nontopk}")
    tr = bench_training(ctx, use_compile)
    print_training(tr)
    mlp = bench_mlp(ctx)
    print_mlp(mlp)
    dec = bench_decoding(ctx)
    print_decoding(dec)
    prep = bench_prepare() if prepare_tokens > 0 and prepare_input else None
    if prep:
        print(f"\nprepare.py: {prep['tokens']:,} tokens read, tokenized and written to shards: "
              f"{prep['tokens_per_s'] / 1e6:.2f}M tokens/s")
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v
                      for k, v in summary(tr, mlp, dec, prep).items()}))


if __name__ == "__main__":
    main()
