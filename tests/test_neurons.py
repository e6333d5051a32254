"""neurons.py: reading neurons with hooks, streaming their top activations, steering them, and the
read / predict / write signals of the concept search, on tiny models with planted neurons."""
import pytest
import torch
from torch.nn import functional as F

from conftest import concept_data
from toolkit import neurons


def test_capture_is_the_activation_the_mlp_uses(tiny_model):
    model = tiny_model()
    x = torch.randint(0, 1000, (2, 16))
    mlp_io = {}
    hooks = [b.mlp.register_forward_hook(lambda m, i, o, l=l: mlp_io.__setitem__(l, (i[0], o)))
             for l, b in enumerate(model.transformer.h)]
    with neurons.capture(model, [0, 2]) as captured:
        model(x)
    for h in hooks:
        h.remove()
    for l in (0, 2):
        mlp = model.transformer.h[l].mlp
        h, out = mlp_io[l]
        pre = mlp.c_fc(h)
        if l == 0:  # TopK at alpha = 0: GELU of the k largest pre-activations, zeros elsewhere
            mask = torch.zeros_like(pre).scatter_(-1, pre.topk(8, dim=-1).indices, 1.0)
            assert (captured[l] != 0).sum(-1).eq(8).all()
        else:  # the dense last block
            mask = torch.ones_like(pre)
        torch.testing.assert_close(captured[l], F.gelu(pre) * mask, rtol=0, atol=1e-6)
        torch.testing.assert_close(out, mlp.c_proj(captured[l]), rtol=0, atol=1e-6)


def test_collect_streams_the_exact_top_m(tiny_model):
    model = tiny_model()
    tokens = torch.randint(0, 1000, (7, 32))
    stats = neurons.collect(model, tokens, [0, 2], top_m=5, batch_size=2)
    with neurons.capture(model, [0, 2]) as captured:
        model(tokens)
    for l in (0, 2):
        a = captured[l].flatten(0, 1)
        s = stats[l]
        torch.testing.assert_close(s['values'], a.topk(5, dim=0).values, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.gather(0, s['positions']), s['values'], rtol=0, atol=1e-6)
        assert torch.equal(s['fires'], (a > 0).sum(0).float()) and s['n_tokens'] == tokens.numel()
    assert s['topk'] is False and stats[0]['topk'] is True


def test_a_baseline_through_the_steering_hook_is_the_unhooked_model(tiny_model):
    model, x = tiny_model(), torch.randint(0, 1000, (2, 16))
    with neurons.steering(model, 1, 5, None):  # steer.py's baseline: the same hooked path, unchanged
        base, _ = model(x)
    torch.testing.assert_close(base, model(x)[0], rtol=0, atol=1e-5)  # = the unhooked (sparse) forward


@pytest.mark.parametrize('v', [0.0, 3.5])  # 0: an ablation
def test_steering_shifts_the_mlp_output_by_the_change_times_the_decoder_column(tiny_model, v):
    model, x = tiny_model(), torch.randint(0, 1000, (2, 16))
    mlp = model.transformer.h[0].mlp
    with neurons.capture(model, [0]) as captured:
        model(x)
    j = int((captured[0] > 0).flatten(0, 1).sum(0).argmax())  # the neuron that fires most often
    a = captured[0][..., j]
    assert (a > 0).any() and (a == 0).any()
    outs = []
    hook = mlp.register_forward_hook(lambda m, i, o: outs.append(o))
    with neurons.steering(model, 0, j, None):
        model(x)
    with neurons.steering(model, 0, j, v):
        model(x)
    hook.remove()
    torch.testing.assert_close(outs[1] - outs[0], (v - a)[..., None] * mlp.c_proj.weight[:, j], rtol=0, atol=1e-5)


def test_reads_is_mean_on_the_concept_minus_mean_elsewhere_over_the_max(tiny_model):
    model, (tokens, ids) = tiny_model(), concept_data()
    with neurons.capture(model, [1]) as captured:
        model(tokens)
    a = captured[1].flatten(0, 1).clamp(min=0)
    on = torch.isin(tokens.flatten(), torch.tensor(ids))
    expected = (a[on].mean(0) - a[~on].mean(0)) / a.max(0).values.clamp(min=1e-9)
    stats = neurons.collect(model, tokens, [1], top_m=4, marks=neurons.concept_marks(tokens, ids))
    torch.testing.assert_close(neurons.reads(stats[1]), expected, rtol=1e-5, atol=1e-6)


def test_concept_marks_flag_the_concept_and_the_position_before_it():
    tokens = torch.tensor([[7, 1, 7, 2], [1, 1, 3, 7]])
    marks = neurons.concept_marks(tokens, [7])
    assert marks['concept'].tolist() == [[True, False, True, False], [False, False, False, True]]
    assert marks['next_is_concept'].tolist() == [[False, True, False, False], [False, False, True, False]]


def test_concept_stats_from_the_token_sums_equal_collect_with_the_concept_marks(tiny_model):
    model = tiny_model()
    tokens = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(0))  # repeats: few ids
    cached = neurons.collect(model, tokens, [0, 2], top_m=4, batch_size=4, by_token=True)
    for ids in ([7], [3, 11, 40]):
        marked = neurons.collect(model, tokens, [0, 2], top_m=4, batch_size=4, marks=neurons.concept_marks(tokens, ids))
        for l in (0, 2):
            s = neurons.concept_stats(cached[l], ids)
            assert s['mark_count'] == marked[l]['mark_count']
            for name in ('concept', 'next_is_concept'):
                torch.testing.assert_close(s['mark_sum'][name], marked[l]['mark_sum'][name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(neurons.reads(s), neurons.reads(marked[l]), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(neurons.predicts(s), neurons.predicts(marked[l]), rtol=1e-4, atol=1e-5)


def plant_reader(model, layer, j, token):
    """Make neuron j of a block fire on `token` alone: the token's embedding gets a long random
    direction u, which the residual stream carries into the MLP, the neuron's encoder row is u, and
    a negative bias keeps it off where attention has mixed only a little u into other positions."""
    u = F.normalize(torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():
        model.transformer.wte.weight[token] = 3 * u
        model.transformer.h[layer].mlp.c_fc.weight[j] = 3 * (u - u.mean())
        model.transformer.h[layer].mlp.c_fc.bias[j] = -8.0


def test_predicts_finds_a_neuron_that_fires_just_before_the_concept(tiny_model):
    model, X, C, j = tiny_model(), 5000, 6000, 40
    plant_reader(model, 0, j, X)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 1000, (8, 32), generator=g)
    tokens[:, 5::8], tokens[:, 6::8] = X, C  # the concept C always follows X
    stats = neurons.collect(model, tokens, [0], top_m=4, marks=neurons.concept_marks(tokens, [C]))
    assert int(neurons.predicts(stats[0]).argmax()) == j
    assert int(neurons.reads(stats[0]).argmax()) != j  # it does not fire on the concept itself


def test_writes_finds_a_decoder_column_set_to_the_concept_unembedding(tiny_model):
    model, C, j = tiny_model(), 6000, 77
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[:, j] = 0.5 * model.lm_head.weight[C]
    score = neurons.writes(model, 1, [C])
    assert int(score.argmax()) == j and score[j] > 3  # standard deviations above the average token


def test_a_neuron_promotes_the_token_its_decoder_column_points_at(tiny_model):
    model, C, j = tiny_model(), 6000, 77
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[:, j] = 0.5 * model.lm_head.weight[C]
    assert neurons.promoted_tokens(model, 1, j)[0] == C


def test_each_row_of_a_batch_is_steered_as_it_would_be_alone(tiny_model):
    model, x = tiny_model(), torch.randint(0, 1000, (4, 16))
    rows = [(0, 5, 3.0), None, (1, 2, -1.0), (0, 7, 0.0)]  # two layers, a baseline row, an ablation
    with neurons.steering_rows(model, rows):
        together, _ = model(x)
    for i, row in enumerate(rows):
        layer, neuron, value = row or (0, 5, None)  # the baseline: hooked, unchanged
        with neurons.steering(model, layer, neuron, value):
            alone, _ = model(x[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # the steering did change row 0


def test_rows_that_do_not_match_the_batch_are_refused(tiny_model):
    model, x = tiny_model(), torch.randint(0, 1000, (3, 16))
    with neurons.steering_rows(model, [(0, 5, 3.0), None]), pytest.raises(ValueError, match="2 rows given for a batch of 3"):
        model(x)
