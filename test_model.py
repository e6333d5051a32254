"""
The model and its training loop, as behaviour: the TopK activation is exactly SPEC section 1,
topk = 0 is exactly GPT-2, and train.py / sample.py work end to end on a tiny run.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

import toy_corpus
from common import EOT, encode, write_shard
from model import GPT, GPTConfig, TopK

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(block_size=32, vocab_size=128, n_layer=3, n_head=2, n_embd=32, topk=8, n_nontopk=1)


def run(script, *args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


# -----------------------------------------------------------------------------
# the TopK activation


def test_alpha_0_keeps_exactly_the_topk_preactivations_with_gelu_values():
    torch.manual_seed(0)
    act, x = TopK(k=5), torch.randn(4, 7, 40)
    act.alpha.fill_(0.0)
    y = act(x)
    assert ((y != 0).sum(-1) == 5).all()
    kept = x.topk(5, dim=-1).indices
    assert torch.equal(y.gather(-1, kept), F.gelu(x.gather(-1, kept)))


def test_alpha_0_keeps_exactly_k_even_when_values_tie():
    act = TopK(k=3)
    x = torch.ones(2, 10, dtype=torch.bfloat16)  # every entry ties for the k-th place
    assert ((act(x) != 0).sum(-1) == 3).all()


def test_alpha_1_is_the_dense_gelu():
    act, x = TopK(k=2), torch.randn(3, 16)
    act.alpha.fill_(1.0)
    assert torch.equal(act(x), F.gelu(x))


def test_intermediate_alpha_follows_the_formula():
    torch.manual_seed(1)
    act, x, k, alpha = TopK(k=4), torch.randn(5, 24), 4, 0.5
    act.alpha.fill_(alpha)
    in_topk = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)
    # y = alpha * f(x) + (1 - alpha) * (f(x) on the top-k entries, 0 elsewhere)
    expected = alpha * F.gelu(x) + (1 - alpha) * torch.where(in_topk, F.gelu(x), torch.zeros_like(x))
    torch.testing.assert_close(act(x), expected)


def test_alpha_0_gives_gradient_only_to_the_selected_neurons():
    act = TopK(k=3)
    x = torch.randn(6, 20, requires_grad=True)
    act(x).sum().backward()
    selected = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(3, dim=-1).indices, True)
    assert (x.grad[~selected] == 0).all()
    assert (x.grad[selected] != 0).all()


# -----------------------------------------------------------------------------
# the architecture


def test_the_last_n_nontopk_blocks_are_dense():
    model = tiny_model(n_layer=4, n_nontopk=2)
    kinds = [type(block.mlp.act) for block in model.transformer.h]
    assert kinds == [TopK, TopK, torch.nn.GELU, torch.nn.GELU]
    assert all(block.mlp.act.k == 8 for block in model.transformer.h[:2])


def test_set_alpha_reaches_every_topk_block():
    model = tiny_model()
    model.set_alpha(0.25)
    assert [float(b.mlp.act.alpha) for b in model.transformer.h[:2]] == [0.25, 0.25]


def test_parameter_names_follow_gpt2_and_embeddings_are_tied():
    model = tiny_model()
    names = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                 "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert name in names
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projections_get_the_scaled_gpt2_init():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=8, n_head=4, n_embd=256, topk=0))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def gpt2_reference_forward(sd, idx, n_layer, n_head):
    """GPT-2 written out from its weights alone: no code shared with model.py."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def linear(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    T = idx.shape[1]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        q, k, v = linear(ln(x, p + "ln_1"), p + "attn.c_attn").chunk(3, dim=-1)
        heads = [t.unflatten(-1, (n_head, -1)).transpose(1, 2) for t in (q, k, v)]
        att = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(heads[0].shape[-1])
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + linear((att @ heads[2]).transpose(1, 2).flatten(2), p + "attn.c_proj")
        h = linear(ln(x, p + "ln_2"), p + "mlp.c_fc")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + linear(h, p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].T


def test_topk_0_is_exactly_gpt2():
    model = tiny_model(topk=0).eval()
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx, targets=idx)
    expected = gpt2_reference_forward(model.state_dict(), idx, n_layer=3, n_head=2)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_loss_falls_within_a_few_steps_on_toy_data():
    model = tiny_model(vocab_size=50304, block_size=64)
    tokens = torch.tensor([t for doc in toy_corpus.generate(n_docs=8, seed=0) for t in [EOT] + encode(doc)])
    xy = tokens[:4 * 65].view(4, 65)  # one fixed batch of 4 toy sequences
    x, y = xy[:, :-1], xy[:, 1:]
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    losses = []
    for _ in range(15):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_returns_prompt_plus_new_tokens():
    model = tiny_model().eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=5, temperature=1.0, top_k=10)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], torch.zeros(2, 3, dtype=torch.long))


def test_top_k_sampling_draws_only_among_the_k_likeliest_tokens():
    model = tiny_model().eval()
    torch.manual_seed(0)
    out = model.generate(torch.zeros(4, 3, dtype=torch.long), max_new_tokens=6, temperature=1.5, top_k=3)
    logits, _ = model(out[:, :-1], out[:, 1:])  # the logits each new token was drawn from (no cache)
    top3 = logits[:, 2:].topk(3, dim=-1).indices
    assert (top3 == out[:, 3:, None]).any(-1).all()
    greedy = model.generate(torch.zeros(4, 3, dtype=torch.long), max_new_tokens=6, temperature=0)
    assert torch.equal(model.generate(torch.zeros(4, 3, dtype=torch.long), max_new_tokens=6, top_k=1), greedy)


@pytest.mark.parametrize("bad, message", [
    (dict(topk=129), "topk must be in [0, d_ff = 4 * n_embd = 128]"),
    (dict(n_nontopk=4), "n_nontopk must be in [0, n_layer = 3]"),
    (dict(n_embd=30, n_head=4), "n_embd (30) must be divisible by n_head (4)"),
    (dict(n_layer=-1), "n_layer must be positive"),
])
def test_impossible_configurations_fail_at_construction(bad, message):
    with pytest.raises(ValueError) as e:
        GPTConfig(**{**TINY, "n_embd": 32, **bad})
    assert message in str(e.value)


# -----------------------------------------------------------------------------
# train.py and sample.py end to end on a tiny run

TRAIN_FLAGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
               "--gradient_accumulation_steps=1", "--topk=8", "--n_nontopk=1", "--max_iters=12",
               "--eval_interval=6", "--eval_iters=2", "--log_interval=3", "--ckpt_interval=6",
               "--warmup_iters=2", "--lr_decay_iters=12", "--learning_rate=3e-3", "--compile=False"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    tokens = []
    for i in range(60):
        tokens += [EOT] + encode(f"Document {i}: the office meeting ran late, so the manager paid overtime.")
    write_shard(str(root / "data" / "tiny_val_000000.bin"), tokens[:400])
    write_shard(str(root / "data" / "tiny_train_000001.bin"), tokens)
    result = run("train.py", f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}", *TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    return root, result.stdout


def test_train_logs_loss_lr_alpha_and_throughput(tiny_run):
    _, stdout = tiny_run
    lines = [l for l in stdout.splitlines() if l.startswith("iter ")]
    assert len(lines) == 4
    assert all(("loss" in l and "lr" in l and "alpha" in l and "tok/s" in l) for l in lines)
    assert "alpha 0.000" in lines[-1]  # annealed to sparse after 20% of 12 iterations


def test_train_evaluates_val_loss_and_perplexity(tiny_run):
    _, stdout = tiny_run
    evals = [l for l in stdout.splitlines() if l.startswith("step ")]
    assert [l.split(":")[0] for l in evals] == ["step 6", "step 12"]
    val, ppl = (float(evals[-1].split(s)[1].split(",")[0]) for s in ("val loss ", "val ppl "))
    assert ppl == pytest.approx(math.exp(val), rel=1e-3)


def test_train_writes_resumable_and_series_checkpoints(tiny_run):
    root, _ = tiny_run
    files = sorted(os.listdir(root / "out"))
    assert files == ["ckpt.pt", "ckpt_000000.pt", "ckpt_000006.pt", "ckpt_000012.pt"]
    ckpt = torch.load(root / "out" / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= ckpt.keys()
    assert ckpt["iter_num"] == 12 and ckpt["model_args"]["topk"] == 8
    series = torch.load(root / "out" / "ckpt_000006.pt", weights_only=True)
    assert series["iter_num"] == 6 and "optimizer" not in series


def test_sample_prints_continuations_of_the_prompt(tiny_run):
    root, _ = tiny_run
    result = run("sample.py", f"--out_dir={root / 'out'}", "--start=The office", "--num_samples=2",
                 "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr
    samples = [s.strip() for s in result.stdout.split("---------------") if s.strip()]
    assert len(samples) == 2 and all(s.startswith("The office") and len(s) > len("The office") for s in samples)


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=many", "--batch_size expects int, got 'many'"),
    ("--n_layers=4", "unknown flag --n_layers"),
    ("--topk=5000", "topk must be in [0, d_ff = 4 * n_embd = 128]"),
])
def test_train_configuration_errors_are_one_line(tiny_run, tmp_path, flag, message):
    root, _ = tiny_run
    result = run("train.py", f"--data_dir={root / 'data'}", f"--out_dir={tmp_path / 'out'}", *TRAIN_FLAGS, flag)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_help_lists_every_key_with_its_default():
    result = run("train.py", "--help")
    assert result.returncode == 0
    for key in ("--topk=64", "--n_nontopk=2", "--annealing_ratio=0.2", "--init_from='scratch'"):
        assert key in result.stdout
