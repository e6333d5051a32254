"""Tests of the fast paths: each must give the reference path's numbers. Speed is bench.py's job."""
import json
import math

import pytest
import torch
from torch.nn import functional as F

from conftest import DEVICES, FINEWEB_SAMPLE, main_of, saved_sizes
from model import GPTConfig, MLP
from toolkit import cpu_fast, fused_loss, memory, sparse_mlp


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the MLPs that took the sparse path."""
    calls = []
    real = sparse_mlp.topk_mlp

    def counted(*args):
        calls.append(args[3])  # k
        return real(*args)

    monkeypatch.setattr(sparse_mlp, "topk_mlp", counted)
    monkeypatch.setattr(sparse_mlp, "enabled", True)
    return calls


def run_mlp(mlp, x, g, fast):
    with sparse_mlp.switched(fast):
        mlp.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_()
        out = cpu_fast.mlp_forward(mlp, x)
        out.backward(g)
    return [out.detach(), x.grad] + [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize("n_embd,k,bias,dtype,gelu", [
    (40, 7, True, torch.float64, 'none'),  # widths that are not powers of two
    (40, 7, False, torch.float64, 'none'),
    (32, 1, True, torch.float64, 'none'),
    (48, 192, True, torch.float64, 'none'),  # k = d_ff: nothing is dropped
    (64, 16, True, torch.float32, 'none'),
    (40, 7, True, torch.float64, 'tanh'),  # GPT-2's own GELU, for its weights
])
def test_sparse_mlp_equals_reference(n_embd, k, bias, dtype, gelu, fast_calls):
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(n_embd=n_embd, n_head=1, bias=bias, topk=k, gelu=gelu), k).to(dtype)
    x = torch.randn(3, 11, n_embd, dtype=dtype)
    g = torch.randn(3, 11, n_embd, dtype=dtype)
    ref = run_mlp(mlp, x, g, fast=False)
    assert fast_calls == []
    fast = run_mlp(mlp, x, g, fast=True)
    assert fast_calls == [k]
    assert len(ref) == (6 if bias else 4)  # output, input and every parameter
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_a_model_runs_model_py_alone_until_a_script_enables_the_fast_paths(tiny_model, fast_calls, monkeypatch):
    fused_calls = []
    monkeypatch.setattr(fused_loss, "cross_entropy", lambda *a: fused_calls.append(1) or F.cross_entropy(
        a[0].reshape(-1, a[0].size(-1)) @ a[1].T, a[2].reshape(-1), ignore_index=-1))
    model = tiny_model(**PERF)
    idx = torch.randint(97, (2, 16), generator=torch.Generator().manual_seed(5))
    model(idx, idx, return_logits=False)[1].backward()
    model.generate(idx[:1, :4], 3, temperature=0)
    assert fast_calls == [] and fused_calls == []
    keys = list(model.state_dict())
    cpu_fast.enable(model)
    model(idx, idx, return_logits=False)[1].backward()
    assert fast_calls == [7, 7] and fused_calls == [1]
    assert list(model.state_dict()) == keys  # what a checkpoint holds is the same


@pytest.mark.parametrize("gelu", ['none', 'tanh'])
def test_sparse_mlp_gradcheck(gelu):
    torch.manual_seed(0)
    C, F, N, k = 6, 24, 5, 4
    args = [torch.randn(N, C), torch.randn(F, C), torch.randn(F), torch.randn(C, F), torch.randn(C)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: sparse_mlp.TopKMLP.apply(*a, k, gelu), args)


def test_sparse_path_saves_no_dense_activation():
    """Only h and k values and indices per token are kept for the backward, no (N, d_ff) tensor."""
    torch.manual_seed(0)
    N, C, k = 50, 40, 7
    mlp = MLP(GPTConfig(n_embd=C, n_head=1, topk=k), k)
    sizes = saved_sizes(lambda: cpu_fast.mlp_forward(mlp, torch.randn(1, N, C, requires_grad=True)))
    assert sizes and max(sizes) == N * C  # h itself; the dense path keeps N * 4C more than once


PERF = dict(vocab_size=97, block_size=16, n_layer=3, n_head=4, n_embd=40, topk=7, n_nontopk=1)  # widths not powers of 2


def test_training_step_equals_reference(tiny_model, fast_calls):
    model = cpu_fast.enable(tiny_model(**PERF).double())
    idx = torch.randint(97, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for fast in (False, True):
        with sparse_mlp.switched(fast):
            model.zero_grad(set_to_none=True)
            _, loss = model(idx, idx.roll(-1, 1))
            loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert fast_calls == [7, 7]  # the two TopK blocks of three, once
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_alpha_zero_is_sparse(tiny_model, fast_calls):
    model = cpu_fast.enable(tiny_model(**PERF))
    idx = torch.randint(97, (2, 16))
    for alpha, n_fast in ((1.0, 0), (0.5, 0), (1e-9, 0), (0.0, 2)):
        fast_calls.clear()
        model.set_alpha(alpha)
        model(idx)
        assert len(fast_calls) == n_fast, alpha


def test_hooks_on_the_activation_force_the_reference(tiny_model, fast_calls):
    """Capturing and steering neurons hook mlp.act: the hook must see and change the real tensor."""
    model = cpu_fast.enable(tiny_model(**PERF).eval())
    idx = torch.randint(97, (1, 16))
    with torch.no_grad():
        plain = model(idx)[0]
    seen = []

    def steer(module, inputs, out):
        seen.append(out.clone())
        out[..., 3] = 5.0  # after the TopK mask, as steer.py does
        return out

    handle = model.transformer.h[0].mlp.act.register_forward_hook(steer)
    fast_calls.clear()
    with torch.no_grad():
        steered = model(idx)[0]
        assert fast_calls == [7]  # block 1 is unhooked and stays fast
        with sparse_mlp.switched(False):
            reference = model(idx)[0]
    handle.remove()
    assert seen[0].shape == (1, 16, 160) and ((seen[0] != 0).sum(-1) == 7).all()
    torch.testing.assert_close(steered, reference)
    assert not torch.allclose(steered, plain)


def test_autocast_and_compile_use_the_reference(tiny_model, fast_calls):
    model = cpu_fast.enable(tiny_model(**PERF))
    idx = torch.randint(97, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    assert fast_calls == []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # traces MLP.forward without a C++ compiler
    with torch.no_grad():
        out = compiled(idx)[0]
        assert fast_calls == []
        torch.testing.assert_close(out, model(idx)[0])
    assert fast_calls == [7, 7]


def test_sparse_decoding_equals_dense(tiny_model, fast_calls):
    model = cpu_fast.enable(tiny_model(**PERF))
    prompt = torch.randint(97, (1, 5))
    outs = []
    for fast in (False, True):
        with sparse_mlp.switched(fast):
            outs.append(model.generate(prompt, 8, temperature=0))
    assert fast_calls and torch.equal(outs[0], outs[1])


PROJ, FC = "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_fc.weight"
UPDATES = {  # weight changes a user makes between two generate calls
    "in place": lambda model: model.get_parameter(PROJ).copy_(torch.randn(40, 160)),
    "load_state_dict": lambda model: model.load_state_dict({**model.state_dict(), FC: torch.randn(160, 40) * 0.1}),
    # ablating neurons as tutorials do: a write through .data does not advance the version counter
    "through .data": lambda model: model.get_parameter(PROJ).data[:, :80].zero_(),
}


@pytest.mark.parametrize("update", UPDATES.values(), ids=UPDATES.keys())
def test_decoding_sees_every_weight_change_between_calls(tiny_model, fast_calls, update):
    model = cpu_fast.enable(tiny_model(**PERF))
    prompt = torch.randint(97, (1, 5), generator=torch.Generator().manual_seed(4))
    before = model.generate(prompt, 12, temperature=0)
    with torch.no_grad():
        update(model)
    fast_calls.clear()
    after = model.generate(prompt, 12, temperature=0)
    assert fast_calls  # decoded on the sparse path
    with sparse_mlp.switched(False):
        reference = model.generate(prompt, 12, temperature=0)
    assert torch.equal(after, reference) and not torch.equal(after, before)


def test_fused_loss_equals_cross_entropy_in_value_and_gradients(monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 8 * 97 * 10)  # chunks of 10 tokens: 4 of them, the last short
    torch.manual_seed(0)
    x = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 24, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(97, (37,))
    targets[[3, 20]] = -1  # ignored positions, as F.cross_entropy's ignore_index=-1
    results = []
    for loss_fn in (lambda: fused_loss.cross_entropy(x, w, targets),
                    lambda: F.cross_entropy(x @ w.T, targets, ignore_index=-1)):
        x.grad = w.grad = None
        loss = loss_fn()
        (2.5 * loss).backward()  # the incoming gradient scales both
        results.append((loss.detach(), x.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_training_without_logits_gives_the_reference_loss_and_gradients(tiny_model):
    model = cpu_fast.enable(tiny_model(**PERF).double())
    idx = torch.randint(97, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, idx.roll(-1, 1), return_logits=return_logits)
        assert (logits is None) == (not return_logits)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_training_without_logits_keeps_no_tokens_by_vocabulary_tensor(tiny_model):
    model = cpu_fast.enable(tiny_model(**{**PERF, 'vocab_size': 1000}))
    idx = torch.randint(1000, (4, 16))
    sizes = saved_sizes(lambda: model(idx, idx, return_logits=False))
    assert sizes and max(sizes) < 4 * 16 * 1000  # the logits would be (64, 1000)


def test_saved_for_backward_counts_activations_not_the_autocast_copies_of_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    forward = lambda x, y, return_logits: lin(x)  # noqa: E731 (the signature bench.py calls)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)  # saves bf16 copies of x and of the weight
    assert memory.saved_for_backward(lin.parameters(), forward, x, None, bf16) == x.numel() * 2


@pytest.mark.parametrize("device", DEVICES)
def test_the_peak_memory_of_a_call_is_its_high_point_beyond_what_was_allocated_before(device):
    mib = lambda: torch.ones(2**20 // 4, device=device)  # noqa: E731 (one MiB of float32)
    before = mib()  # noqa: F841 (held through the call, and not counted)

    def call():
        a, b = mib(), mib()  # 2 MiB at once: the high point
        del a, b
        c = mib()  # noqa: F841 (1 MiB more, after those were freed)
    assert memory.peak_memory(call, device) == pytest.approx(2 * 2**20, rel=0.01)


BENCH_TINY = ("--n_layer=2 --n_head=2 --n_embd=32 --block_size=16 --batch_size=2 --topk=8 --n_nontopk=1 "
              "--train_iters=1 --warmup_iters=1 --mlp_tokens=64 --mlp_iters=1 --decode_prompt=8 "
              "--decode_new=8 --sparse_n_layer=2 --sparse_n_head=2 --sparse_n_embd=32 --sparse_prompt=4 "
              "--sparse_new=4 --decode_repeats=1 --sparse_repeats=1 --prepare_tokens=20000").split()


@pytest.fixture
def bench(run_main, monkeypatch, tmp_path):
    """bench(*flags): bench.py with BENCH_TINY and the flags, in this process (no interpreter start),
    from tmp_path; (what it printed, its JSON summary line)."""
    def run_bench(*flags):
        monkeypatch.chdir(tmp_path)
        stdout = run_main("toolkit.bench", *BENCH_TINY, *flags)
        return stdout, json.loads(stdout.strip().splitlines()[-1])
    return run_bench


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One whole bench.py run, shared: (what it printed, its JSON line, the input shapes of the MLPs
    the sparse path ran, those of the MLPs model.py's MLP.forward ran)."""
    sparse, reference = [], []
    real_sparse, real_forward = sparse_mlp.topk_mlp, MLP.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("bench"))
        mp.setattr(sparse_mlp, "topk_mlp", lambda x, *a: sparse.append(tuple(x.shape)) or real_sparse(x, *a))
        mp.setattr(MLP, "forward", lambda mlp, x: reference.append(tuple(x.shape)) or real_forward(mlp, x))
        stdout = main_of("toolkit.bench", *BENCH_TINY, f"--prepare_input={FINEWEB_SAMPLE}")
    return stdout, json.loads(stdout.strip().splitlines()[-1]), sparse, reference


def test_bench_runs_end_to_end(bench_run):
    stdout, result, _, _ = bench_run
    cpu_only = ("mlp_topk_over_dense", "sparse_decode_speedup")  # sparse_mlp.py's rows
    for key in ("train_topk_over_dense", "anneal_over_dense", "kv_cache_speedup", "prepare_tokens_per_s") + (
            cpu_only if result["device"] == "cpu" else ()):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["peak_mib_dense"] > 0 and result["peak_mib_topk"] > 0  # the steps' allocations were seen
    assert result["kv_cache_same_tokens"]
    if result["device"] == "cpu":
        assert result["sparse_decode_same_tokens"] and result["sparse_decode_max_abs_diff"] < 1e-5
    else:
        assert all(result[key] is None for key in cpu_only)
    assert "training iteration" in stdout and "decoding" in stdout


def test_bench_times_the_sparse_mlp_row_on_the_sparse_path_and_the_reference_row_off_it(bench_run):
    _, result, sparse, reference = bench_run
    mlp_row = (1, 64, 32)  # BENCH_TINY's --mlp_tokens=64 of width 32
    assert mlp_row in reference
    if result["device"] == "cpu":
        assert mlp_row in sparse
    else:  # the sparse path is the CPU's (torch.compile takes no sparse CSR tensors): never run on CUDA
        assert sparse == []


def test_bench_without_its_tokenization_input_skips_that_row_and_still_prints_the_summary(bench):
    stdout, result = bench("--prepare_input=missing.parquet")
    note = "note: --prepare_input missing.parquet not found"
    assert note in stdout and stdout.index(note) < stdout.index("training iteration")  # said before the timings
    assert result["prepare_tokens_per_s"] is None and isinstance(result["kv_cache_speedup"], float)
