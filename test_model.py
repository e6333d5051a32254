"""
model.py as behaviour: the TopK activation is exactly y = f(x) * (alpha + (1 - alpha) * m) with m
the top-k mask, topk = 0 is exactly GPT-2, a tiny model learns, and generate samples as it says.
(train.py and sample.py end to end: test_train.py.)
"""
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn import functional as F

from conftest import DEVICES, TINY, needs_cuda, saved_sizes
from model import GPT, GPTConfig, TopK, annealed_alpha, trained_alpha
from toolkit import toy_corpus
from toolkit.common import device_facts
from toolkit.data import EOT, encode

SMALL_VOCAB = dict(vocab_size=128)  # conftest's tiny model with a small vocabulary


# -----------------------------------------------------------------------------
# the TopK activation


def test_alpha_0_keeps_exactly_the_topk_preactivations_with_gelu_values():
    torch.manual_seed(0)
    act, x = TopK(k=5), torch.randn(4, 7, 40)
    act.set_alpha(0.0)
    y = act(x)
    assert ((y != 0).sum(-1) == 5).all()
    kept = x.topk(5, dim=-1).indices
    assert torch.equal(y.gather(-1, kept), F.gelu(x.gather(-1, kept)))


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_0_keeps_exactly_k_even_when_values_tie(device):
    act = TopK(k=3).to(device)
    x = torch.ones(2, 10, dtype=torch.bfloat16, device=device)  # every entry ties for the k-th place
    assert ((act(x) != 0).sum(-1) == 3).all()


def test_alpha_1_is_the_dense_gelu():
    act, x = TopK(k=2), torch.randn(3, 16)
    act.set_alpha(1.0)
    assert torch.equal(act(x), F.gelu(x))


def test_intermediate_alpha_follows_the_formula():
    torch.manual_seed(1)
    act, x, k, alpha = TopK(k=4), torch.randn(5, 24), 4, 0.5
    act.set_alpha(alpha)
    in_topk = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)
    # y = alpha * f(x) + (1 - alpha) * (f(x) on the top-k entries, 0 elsewhere)
    expected = alpha * F.gelu(x) + (1 - alpha) * torch.where(in_topk, F.gelu(x), torch.zeros_like(x))
    torch.testing.assert_close(act(x), expected)


@pytest.mark.parametrize("schedule,expected", [
    ("linear", lambda u: 1 - u),  # the paper's
    ("cosine", lambda u: (1 + math.cos(math.pi * u)) / 2),
    ("step", lambda u: 0.0),  # TopK from the first iteration
])
def test_every_annealing_schedule_follows_its_formula_and_ends_at_0(schedule, expected):
    # annealing over 0.2 of 100 iterations: u = it / 20
    for it in (0, 5, 10, 15, 19):
        assert annealed_alpha(it, 20, schedule) == pytest.approx(expected(it / 20), abs=1e-12), it
    assert [annealed_alpha(it, 20, schedule) for it in (20, 21, 99)] == [0.0, 0.0, 0.0]


def test_only_step_annealing_is_topk_at_iteration_0():
    assert [annealed_alpha(0, 20, s) for s in ("linear", "cosine", "step")] == [1.0, 1.0, 0.0]


def test_a_checkpoints_alpha_is_read_with_its_own_schedule():  # what the analysis scripts read it as
    ckpt = dict(iter_num=0, config=dict(annealing_ratio=0.2, max_iters=100, annealing_schedule="step"))
    assert trained_alpha(ckpt) == 0.0
    assert trained_alpha(dict(ckpt, config=dict(ckpt["config"], annealing_schedule="linear"))) == 1.0


def test_a_checkpoints_alpha_follows_the_span_its_run_started_with():  # an extended run keeps it
    ckpt = dict(iter_num=4, anneal_span=2, config=dict(annealing_ratio=0.5, max_iters=12))
    assert trained_alpha(ckpt) == 0.0
    assert trained_alpha({k: v for k, v in ckpt.items() if k != "anneal_span"}) == pytest.approx(1 - 4 / 6)


def test_the_tanh_gelu_is_gpt2s_own_approximation():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    gpt2 = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # OpenAI's gelu
    act = TopK(k=101, gelu="tanh")
    act.set_alpha(1.0)
    torch.testing.assert_close(act(x), gpt2)
    assert not torch.allclose(TopK(k=101)(x), gpt2, atol=1e-5)  # the exact GELU is another function


def formula(x, k, alpha):
    """The paper's y = gelu(x) * (alpha + (1 - alpha) * m), m from topk indices, as a reference."""
    m = torch.zeros_like(x).scatter_(-1, x.topk(k, dim=-1).indices, 1.0)
    return F.gelu(x) * (alpha + (1 - alpha) * m)


def test_alpha_0_takes_a_lean_path_with_the_formulas_outputs_and_gradients_even_on_ties():
    torch.manual_seed(2)
    x = torch.randint(-2, 3, (6, 40)).float().requires_grad_()  # five values: ties at every k-th place
    g = torch.randn(6, 40)
    act = TopK(k=7)
    act.set_alpha(0.0)
    assert act.annealed
    (y,), (ref,) = (torch.autograd.grad(f(x), x, g) for f in (act, lambda x: formula(x, 7, 0.0)))
    assert torch.equal(act(x), formula(x, 7, 0.0)) and torch.equal(y, ref)


def test_the_lean_path_saves_only_k_values_per_token_for_the_backward():
    x = torch.randn(8, 512, requires_grad=True)
    act = TopK(k=16)
    act.set_alpha(1e-3)  # annealing: the formula's d_ff-wide tensors
    assert not act.annealed and sum(saved_sizes(lambda: act(x))) >= 2 * x.numel()
    act.set_alpha(0.0)
    assert sum(saved_sizes(lambda: act(x))) <= 3 * 8 * 16  # indices and values of the k kept


def test_alpha_0_gives_gradient_only_to_the_selected_neurons():
    act = TopK(k=3)
    x = torch.randn(6, 20, requires_grad=True)
    act(x).sum().backward()
    selected = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(3, dim=-1).indices, True)
    assert (x.grad[~selected] == 0).all()
    assert (x.grad[selected] != 0).all()


# -----------------------------------------------------------------------------
# the architecture


def test_the_last_n_nontopk_blocks_are_dense(tiny_model):
    model = tiny_model(**SMALL_VOCAB, n_layer=4, n_nontopk=2)
    kinds = [type(block.mlp.act) for block in model.transformer.h]
    assert kinds == [TopK, TopK, torch.nn.GELU, torch.nn.GELU]
    assert all(block.mlp.act.k == 8 for block in model.transformer.h[:2])


def test_set_alpha_reaches_every_topk_block(tiny_model):
    model = tiny_model(**SMALL_VOCAB)
    model.set_alpha(0.25)
    assert [float(b.mlp.act.alpha) for b in model.transformer.h[:2]] == [0.25, 0.25]


def test_parameter_names_follow_gpt2_and_embeddings_are_tied(tiny_model):
    model = tiny_model(**SMALL_VOCAB)
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


def test_topk_0_is_exactly_gpt2(tiny_model):
    model = tiny_model(**SMALL_VOCAB, topk=0)
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx, targets=idx)
    expected = gpt2_reference_forward(model.state_dict(), idx, n_layer=3, n_head=2)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_loss_falls_within_a_few_steps_on_toy_data(tiny_model):
    model = tiny_model(block_size=64)
    tokens = torch.tensor([t for doc in toy_corpus.generate(n_docs=8, seed=0) for t in [EOT] + encode(doc)])
    xy = tokens[:4 * 65].view(4, 65)  # one fixed batch of 4 toy sequences
    x, y = xy[:, :-1], xy[:, 1:]
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), fused=False)
    losses = []
    for _ in range(15):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_returns_prompt_plus_new_tokens(tiny_model):
    model = tiny_model(**SMALL_VOCAB)
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=5, temperature=1.0, top_k=10)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], torch.zeros(2, 3, dtype=torch.long))


def test_top_k_sampling_draws_only_among_the_k_likeliest_tokens(tiny_model):
    model = tiny_model(**SMALL_VOCAB)
    torch.manual_seed(0)
    out = model.generate(torch.zeros(4, 3, dtype=torch.long), max_new_tokens=6, temperature=1.5, top_k=3)
    logits, _ = model(out[:, :-1], out[:, 1:])  # the logits each new token was drawn from (no cache)
    top3 = logits[:, 2:].topk(3, dim=-1).indices
    assert (top3 == out[:, 3:, None]).any(-1).all()
    greedy = model.generate(torch.zeros(4, 3, dtype=torch.long), max_new_tokens=6, temperature=0)
    assert torch.equal(model.generate(torch.zeros(4, 3, dtype=torch.long), max_new_tokens=6, top_k=1), greedy)


@pytest.mark.parametrize("temperature, top_k", [(0, None), (1.0, None), (1.0, 5)])
def test_padded_ids_past_the_tokenizers_vocabulary_are_never_drawn(tiny_model, temperature, top_k):
    model, prompt = tiny_model(**SMALL_VOCAB), torch.zeros(4, 2, dtype=torch.long)
    favour = model.lm_head.register_forward_hook(lambda m, i, out: out + 100 * (torch.arange(out.size(-1)) >= 60))
    torch.manual_seed(0)
    assert (model.generate(prompt, 6, temperature=temperature, top_k=top_k)[:, 2:] >= 60).all()  # padded ids win
    out = model.generate(prompt, 6, temperature=temperature, top_k=top_k, vocab_size=60)
    favour.remove()
    assert (out[:, 2:] < 60).all()


def test_a_block_of_rows_with_its_own_generator_draws_what_it_draws_alone(tiny_model):
    model, prompt = tiny_model(**SMALL_VOCAB), torch.zeros(3, 2, dtype=torch.long)
    gen = lambda seed: torch.Generator().manual_seed(seed)
    together = model.generate(torch.cat([prompt, prompt + 1]), 8, temperature=1.0, generators=[gen(5), gen(6)])
    assert torch.equal(together[:3], model.generate(prompt, 8, temperature=1.0, generators=[gen(5)]))
    assert torch.equal(together[3:], model.generate(prompt + 1, 8, temperature=1.0, generators=[gen(6)]))
    torch.manual_seed(5)  # a generator seeded s draws what torch's global one does after manual_seed(s)
    assert torch.equal(together[:3], model.generate(prompt, 8, temperature=1.0))


@pytest.mark.parametrize("bad, message", [
    (dict(topk=129), "topk must be in [0, d_ff = 4 * n_embd = 128]"),
    (dict(n_nontopk=4), "n_nontopk must be in [0, n_layer = 3]"),
    (dict(n_embd=30, n_head=4), "n_embd (30) must be divisible by n_head (4)"),
    (dict(n_layer=-1), "n_layer must be positive"),
])
def test_impossible_configurations_fail_at_construction(bad, message):
    with pytest.raises(ValueError) as e:
        GPTConfig(**{**TINY, **SMALL_VOCAB, **bad})
    assert message in str(e.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk", [0, 7])
def test_kv_cache_equals_no_cache(tiny_model, topk, device):
    model = tiny_model(**SMALL_VOCAB, block_size=16, topk=topk).to(device)  # fp32: no rounding to part greedy paths
    prompt = torch.randint(128, (2, 6), generator=torch.Generator().manual_seed(2)).to(device)
    # 6 + 24 tokens runs past block_size 16, where the cache is dropped and rebuilt
    cached = model.generate(prompt, 24, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 24, temperature=0, use_cache=False)
    assert cached.shape == (2, 30) and torch.equal(cached, uncached)


# -----------------------------------------------------------------------------
# torch.compile, as train.py --compile uses it on CUDA, here with inductor's CPU backend (or, where
# only what dynamo traces matters, a backend that counts the graphs it is given)


def compile_case(tiny_model, device="cpu"):
    model = tiny_model(n_layer=1, n_nontopk=0, vocab_size=128, block_size=16).train().to(device)
    gen = torch.Generator().manual_seed(0)
    return model, *(torch.randint(0, 128, (2, 16), generator=gen).to(device) for _ in range(2))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_loss_and_gradients_equal_eager_while_annealing_and_after(tiny_model, device):
    model, x, y = compile_case(tiny_model, device)
    compiled = torch.compile(model)
    for alpha in (1.0, 0.3, 0.0):  # the last takes the lean path, a second graph
        model.set_alpha(alpha)
        results = []
        for m in (model, compiled):
            model.zero_grad()
            _, loss = m(x, y)
            loss.backward()
            results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
        for eager, comp in zip(*results):
            torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_changing_every_step_compiles_once_and_the_end_of_annealing_once_more(tiny_model, device):
    model, x, y = compile_case(tiny_model, device)
    graphs = CompileCounter()
    compiled = torch.compile(model, backend=graphs)
    for alpha in (1.0, 0.8, 0.5, 0.1):
        model.set_alpha(alpha)
        compiled(x, y)[1].backward()
    assert graphs.frame_count == 1
    model.set_alpha(0.0)
    for _ in range(2):
        compiled(x, y)[1].backward()
    assert graphs.frame_count == 2


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_the_model_compiles_to_one_graph_without_breaks(tiny_model, alpha):
    model, x, y = compile_case(tiny_model)
    model.set_alpha(alpha)
    explained = torch._dynamo.explain(model)(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_evaluation_between_training_steps_compiles_its_graph_once(tiny_model):
    model, x, y = compile_case(tiny_model)
    graphs = CompileCounter()
    compiled = torch.compile(model, backend=graphs)
    for _ in range(3):  # train.py's loop: steps, and now and then estimate_loss in eval mode, no_grad
        model.train()
        compiled(x, y)[1].backward()
        model.eval()
        with torch.no_grad():
            compiled(x, y)
    assert graphs.frame_count == 2  # one training graph, one evaluation graph


# -----------------------------------------------------------------------------
# CUDA only: what a GPU run depends on and the CPU cannot show (skipped without a GPU)


@needs_cuda
def test_training_attention_runs_on_the_flash_kernel():
    model = GPT(GPTConfig(n_layer=1, n_head=16, n_embd=1024, block_size=1024, vocab_size=512, topk=64,
                          n_nontopk=0, dropout=0.1)).cuda().train()
    x = torch.randint(0, 512, (2, 1024), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, x)  # raises "No available kernel" if flash cannot take these shapes
    loss.backward()


def torch_fuses_adamw_on_the_cpu():
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:  # older torch: fused AdamW is CUDA's alone
        return False
    return True


@pytest.mark.parametrize("device, params_on, fused", [
    ("cpu", "cpu", False),
    pytest.param("cuda:0", "cpu", True, marks=pytest.mark.skipif(  # CUDA's choice, the parameters left on the CPU
        not torch_fuses_adamw_on_the_cpu(), reason="this torch has no fused AdamW on the CPU")),
    pytest.param("cuda", "cuda", True, marks=needs_cuda),
])
def test_the_optimizer_of_a_cuda_run_steps_with_torchs_fused_adamw_kernel_and_of_a_cpu_run_without(
        tiny_model, monkeypatch, device, params_on, fused):
    calls, real = [], torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(**SMALL_VOCAB).to(params_on)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device_facts(device)["fused_adamw"])  # as train.py
    x = torch.randint(0, SMALL_VOCAB["vocab_size"], (1, 8), device=params_on)
    model(x, x)[1].backward()
    opt.step()
    assert bool(calls) == fused
