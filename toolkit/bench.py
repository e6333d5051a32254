"""
What TopK costs, and what its sparsity saves: the dense model (topk=0) and the TopK model of
the same shape, measured side by side in one process.

    python -m toolkit.bench                  # CPU defaults: a 6-layer, 384-wide model (a few minutes on 2 cores)
    python -m toolkit.bench --preset=gpt2    # GPT-2 small shapes for a GPU (bf16 autocast, torch.compile)

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

from configurator import configure, die
from model import GPT, GPTConfig, MLP
from toolkit import common, cpu_fast, data, memory, sparse_mlp

# -----------------------------------------------------------------------------
preset = ""  # 'gpt2': GPT-2 small shapes for a GPU; explicit flags still override it
device = "auto"  # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'
dtype = "auto"  # 'auto' (bfloat16 on GPUs that compute in it natively, float16 on older ones, float32 on CPU), 'float32', 'bfloat16', 'float16'
compile = "auto"  # torch.compile the training models: 'auto' on CUDA only (as train.py), 'True' on the CPU too, 'False'

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


def bench_training(ctx, use_compile):
    """Training iterations of the dense model and of the TopK model at alpha = 0 and in annealing."""
    B, T = batch_size, block_size
    shape = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, n_nontopk=n_nontopk)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(data.VOCAB_SIZE, (B, T), generator=gen).to(device)
    y = torch.randint(data.VOCAB_SIZE, (B, T), generator=gen).to(device)
    runs = {}
    for name, k in (("dense", 0), ("topk", topk)):
        torch.manual_seed(seed)  # the same initial weights for both
        model = cpu_fast.enable(GPT(GPTConfig(**shape, topk=k)).to(device))
        opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), common.device_facts(device)['fused_adamw'])
        runs[name] = (model, torch.compile(model) if use_compile else model, opt)
    # (model, alpha, sparse_mlp.py on); the reference row differs from "topk" only where sparse_mlp.py runs
    variants = {"dense": ("dense", 0.0, True), "topk": ("topk", 0.0, True), "reference": ("topk", 0.0, False),
                "anneal": ("topk", anneal_alpha, True)}
    if not sparse_paths() or use_compile:
        del variants["reference"]

    def step(variant):
        name, alpha, fast = variants[variant]
        model, fwd, opt = runs[name]
        model.set_alpha(alpha)
        with ctx, sparse_mlp.switched(fast):
            _, loss = fwd(x, y, return_logits=False)  # as train.py
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = race({v: (lambda v=v: step(v)) for v in variants}, train_iters, warmup_iters)
    results = {}
    for v in variants:
        name, alpha, fast = variants[v]
        model, fwd, _ = runs[name]
        model.set_alpha(alpha)
        seconds = statistics.median(times[v])
        with sparse_mlp.switched(fast):
            saved = memory.saved_for_backward(model.parameters(), fwd, x, y, ctx)
        results[v] = dict(seconds=seconds, tokens_per_s=B * T / seconds, vs_dense=ratio(times, v, "dense"),
                          compiled=use_compile, peak=memory.peak_memory(lambda v=v: step(v), device), saved=saved)
        peak = common.peak_flops(device)
        if peak:  # dense-equivalent FLOPs, so the TopK model's MFU is comparable to its twin's
            results[v]["mfu"] = model.flops_per_token() * results[v]["tokens_per_s"] / peak
    return results


def sparse_paths():
    """Whether sparse_mlp.py's paths can run here (fp32 on the CPU): elsewhere the rows that time
    them would time the reference path under another name, so they are left out."""
    return device == "cpu"


def bench_mlp(ctx):
    """Forward+backward of one MLP: dense GELU, TopK on the reference path (dense matmuls, the TopK
    activation) and, on the CPU, TopK on the sparse path."""
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=n_embd, topk=topk, n_nontopk=0)
    torch.manual_seed(seed)
    dense = MLP(cfg, 0).to(device)
    torch.manual_seed(seed)
    sparse = MLP(cfg, topk).to(device)
    h = torch.randn(1, mlp_tokens, n_embd, device=device, requires_grad=True)
    g = torch.randn(1, mlp_tokens, n_embd, device=device)

    def fwd_bwd(mlp, fast):
        with sparse_mlp.switched(fast), ctx:
            out = cpu_fast.mlp_forward(mlp, h)  # as a model with the fast paths enabled runs its MLPs
        out.backward(g.to(out.dtype))

    fns = {"dense": lambda: fwd_bwd(dense, True), "reference": lambda: fwd_bwd(sparse, False)}
    if sparse_paths():
        fns["topk"] = lambda: fwd_bwd(sparse, True)
    times = race(fns, mlp_iters)
    return {v: dict(seconds=statistics.median(times[v]), vs_dense=ratio(times, v, "dense"), peak=memory.peak_memory(fn, device))
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
    model = cpu_fast.enable(GPT(cfg).to(device).eval())
    prompt = torch.randint(data.VOCAB_SIZE, (1, decode_prompt), device=device)
    out = {}

    def run(name, **kw):
        out[name] = generate(model, prompt, decode_new, ctx, **kw)

    t = race({"nocache": lambda: run("nocache", use_cache=False), "cache": lambda: run("cache")},
             decode_repeats)
    if not isinstance(ctx, contextlib.nullcontext):  # under autocast greedy paths part for rounding reasons alone
        for name, use_cache in (("nocache", False), ("cache", True)):
            out[name] = generate(model, prompt, decode_new, contextlib.nullcontext(), use_cache=use_cache)
    results["nocache"] = dict(tokens_per_s=decode_new / statistics.median(t["nocache"]))
    results["cache"] = dict(tokens_per_s=decode_new / statistics.median(t["cache"]), speedup=ratio(t, "nocache", "cache"),
                            same=torch.equal(out["nocache"], out["cache"]))
    del model
    if not sparse_paths():
        return results

    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=sparse_n_layer, n_head=sparse_n_head, n_embd=sparse_n_embd, topk=topk,
                    n_nontopk=n_nontopk, block_size=sparse_prompt + sparse_new)
    model = cpu_fast.enable(GPT(cfg).to(device).eval())
    prompt = torch.randint(data.VOCAB_SIZE, (1, sparse_prompt), device=device)

    def run_large(name, fast, transposed_fc=True):
        out[name] = generate(model, prompt, sparse_new, ctx, fast=fast, transposed_fc=transposed_fc)

    t = race({"dense": lambda: run_large("dense", False), "sparse": lambda: run_large("sparse", True),
              "proj_only": lambda: run_large("proj_only", True, transposed_fc=False)}, sparse_repeats)
    with torch.no_grad(), ctx:  # the logits of every position of the whole generated sequence
        seq = out["dense"][:, :cfg.block_size]
        logits = []
        for fast in (False, True):
            with sparse_mlp.switched(fast):
                logits.append(model.logits(seq).float())
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # prepare.py stands at the top
    docs = pq.read_table(prepare_input, columns=["text"]).column(0).to_pylist()
    repeats = math.ceil(prepare_tokens / len(data.tokenize_documents(docs)))
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(pa.table({"text": docs * repeats}), os.path.join(d, "docs.parquet"))
        run = subprocess.run([sys.executable, os.path.join(root, "prepare.py"), f"--input={d}/docs.parquet",
                              f"--out_dir={d}/shards", f"--val_tokens={prepare_tokens // 20 + 1}"],
                             capture_output=True, text=True)
    if run.returncode:  # the timings so far are kept: the row is skipped, the summary still printed
        print(f"\nprepare.py row skipped: prepare.py failed: {run.stderr.strip().splitlines()[-1]}")
        return None
    tokens, rate = re.search(r"^wrote ([\d,]+) tokens .*: ([\d.]+)M tokens/s", run.stdout, re.M).groups()
    return dict(tokens=int(tokens.replace(",", "")), tokens_per_s=float(rate) * 1e6)


def mib(n):
    return f"{n / 2**20:9.1f}"


def print_training(tr):
    compiled = tr["dense"]["compiled"]
    print(f"\ntraining iteration {' ' * 8} {'ms':>9} {'tokens/s':>9} {'vs dense':>8} {'peak MiB':>9} "
          f"{'saved MiB':>9}" + (f" {'MFU':>6}" if "mfu" in tr["dense"] else ""))
    labels = {"dense": "dense (topk=0)", "topk": "TopK, alpha=0, " + ("sparse path" if "reference" in tr else "lean TopK"),
              "reference": "TopK, alpha=0, lean TopK", "anneal": f"TopK, alpha={anneal_alpha}, formula"}
    for v, r in tr.items():
        print(f"  {labels[v]:<34} {1e3 * r['seconds']:9.1f} {r['tokens_per_s']:9.0f} "
              f"{r['vs_dense']:8.2f} {mib(r['peak'])} {mib(r['saved'])}"
              + (f" {100 * r['mfu']:5.1f}%" if "mfu" in r else ""))
    print("  peak: allocated during one step beyond weights and optimizer state; saved: activations kept for "
          f"the backward; both measured on the timed model{' (compiled)' if compiled else ''}")
    print("  sparse path: sparse_mlp.py (CPU only); lean TopK: dense matmuls, the activation built from the k kept")


def print_mlp(mlp):
    print(f"\nMLP forward+backward, {mlp_tokens} tokens {'ms':>9} {'vs dense':>8} {'peak MiB':>9}")
    labels = {"dense": "dense GELU", "reference": "TopK, dense matmuls + lean TopK", "topk": "TopK, sparse path"}
    for v, r in mlp.items():
        print(f"  {labels[v]:<31} {1e3 * r['seconds']:9.1f} {r['vs_dense']:8.2f} {mib(r['peak'])}")
    if "topk" not in mlp:
        print("  (no sparse-path row: sparse_mlp.py runs on the CPU only, so here it would time the reference)")


def print_decoding(dec):
    small = f"{n_layer}x{n_embd}, {decode_prompt} prompt + {decode_new} new"
    large = f"{sparse_n_layer}x{sparse_n_embd}, {sparse_prompt} prompt + {sparse_new} new"
    labels = {"nocache": f"{small}, no cache", "cache": f"{small}, KV cache",
              "dense_proj": f"{large}, KV cache, dense c_proj", "proj_only": f"{large}, KV cache, sparse c_proj",
              "sparse_proj": f"{large}, KV cache, sparse c_proj + W_fc^T"}
    print(f"\ndecoding, batch 1, greedy {' ' * 31} {'tokens/s':>8} {'speedup':>8}")
    for v, r in dec.items():
        print(f"  {labels[v]:<54} {r['tokens_per_s']:8.1f}" + (
            f" {r['speedup']:8.2f}  same tokens (fp32): {r['same']}" if "speedup" in r else ""))
    if "sparse_proj" in dec:
        print(f"  sparse vs dense c_proj, max |logit difference|: {dec['sparse_proj']['max_abs_diff']:.1e}")
    else:
        print("  (no dense vs sparse c_proj rows: sparse_mlp.py runs on the CPU only, so here they would time one path)")


def summary(tr, mlp, dec, prep):
    """The ratios and rates of every table, for scripts (the last output line, as JSON)."""
    return dict(
        device=device if device == "cpu" else torch.cuda.get_device_name(device), dtype=dtype,
        train_topk_over_dense=tr["topk"]["vs_dense"],
        anneal_over_dense=tr["anneal"]["vs_dense"],
        peak_mem_topk_over_dense=tr["topk"]["peak"] / tr["dense"]["peak"],
        saved_mem_topk_over_dense=tr["topk"]["saved"] / tr["dense"]["saved"],
        mlp_topk_over_dense=mlp["topk"]["vs_dense"] if "topk" in mlp else None,
        mlp_reference_over_dense=mlp["reference"]["vs_dense"],
        mlp_peak_mem_topk_over_dense=mlp["topk"]["peak"] / mlp["dense"]["peak"] if "topk" in mlp else None,
        kv_cache_speedup=dec["cache"]["speedup"],
        kv_cache_same_tokens=dec["cache"]["same"],
        **{key: dec[v][field] if v in dec else None for key, v, field in (
            ("sparse_decode_speedup", "sparse_proj", "speedup"), ("sparse_proj_only_decode_speedup", "proj_only", "speedup"),
            ("sparse_decode_same_tokens", "sparse_proj", "same"), ("sparse_decode_max_abs_diff", "sparse_proj", "max_abs_diff"))},
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
    if compile not in ("auto", "True", "False"):
        die(f"--compile must be auto, True or False, got {compile!r}")
    use_compile = compile == "True" or compile == "auto" and device.startswith("cuda")
    if device == "cpu":
        common.keep_freed_memory()  # as train.py does
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    print(f"device {device}{threads}, {dtype}, torch.compile {'on' if use_compile else 'off'}, torch {torch.__version__}")
    print(f"model: n_layer {n_layer}, n_embd {n_embd}, d_ff {4 * n_embd}, block_size {block_size}, "
          f"batch_size {batch_size}, k {topk}, n_nontopk {n_nontopk}")
    measure_prepare = prepare_tokens > 0 and prepare_input  # relative to the working directory, as typed
    if measure_prepare and not os.path.isfile(prepare_input):
        print(f"note: --prepare_input {prepare_input} not found: the prepare.py row will be skipped")
        measure_prepare = False
    tr = bench_training(ctx, use_compile)
    print_training(tr)
    mlp = bench_mlp(ctx)
    print_mlp(mlp)
    dec = bench_decoding(ctx)
    print_decoding(dec)
    prep = bench_prepare() if measure_prepare else None
    if prep:
        print(f"\nprepare.py: {prep['tokens']:,} tokens read, tokenized and written to shards: "
              f"{prep['tokens_per_s'] / 1e6:.2f}M tokens/s")
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v
                      for k, v in summary(tr, mlp, dec, prep).items()}))


if __name__ == "__main__":
    main()
