"""search.py: the concept search proposes what neurons read, predict and write, ranks them by a
steering trial, and keeps each layer's best as finalists."""
import pytest
import torch
from torch.nn import functional as F

from conftest import concept_data
from toolkit import neurons, search


def test_concept_candidates_rank_the_neuron_that_promotes_the_concept_first(tiny_model):
    model, (tokens, ids) = tiny_model(), concept_data()
    # plant a neuron of layer 1 whose decoder column is ' salary''s (tied) embedding, made long
    # enough that writing it into the residual stream makes ' salary' the likeliest next token
    j, u = 17, F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        model.transformer.wte.weight[ids[2]] = 3 * u
        model.transformer.h[1].mlp.c_proj.weight[:, j] = 10 * u
    stats = neurons.collect(model, tokens, [0, 1], top_m=4, marks=neurons.concept_marks(tokens, ids))
    found = search.concept_candidates(model, stats, ids, tokens, lambda peak: 5.0, 4)
    best = found[0]
    assert (best['layer'], best['neuron']) == (1, j) and best['probability'] > 0.5
    assert 'writes' in best['signals']  # found by its decoder direction, whatever it reads
    assert best['scores']['reads'] == pytest.approx(neurons.reads(stats[1])[j].item())
    assert [c['probability'] for c in found] == sorted((c['probability'] for c in found), reverse=True)
    # with one candidate per signal, only each layer's best neuron by each signal is tried
    found = search.concept_candidates(model, stats, ids, tokens, lambda peak: 5.0, 1)
    for c in found:
        tops = {int(neurons.reads(stats[c['layer']]).argmax()), int(neurons.predicts(stats[c['layer']]).argmax()),
                int(neurons.writes(model, c['layer'], ids).argmax())}
        assert c['neuron'] in tops


def test_the_finalists_are_each_layers_best_then_the_next_best():
    found = [dict(layer=l, neuron=j) for l, j in [(0, 5), (0, 6), (2, 1), (0, 7), (1, 3)]]  # best first
    pick = lambda n: [(c['layer'], c['neuron']) for c in search.pick_finalists(found, n)]
    assert pick(3) == [(0, 5), (2, 1), (1, 3)]
    assert pick(4) == [(0, 5), (2, 1), (1, 3), (0, 6)]
    assert pick(2) == [(0, 5), (2, 1)]


def test_the_batched_trial_gives_each_steering_the_probability_it_gives_alone(tiny_model):
    model, (tokens, ids) = tiny_model(), concept_data()
    rows, ids = tokens[:3], torch.as_tensor(ids)
    entries = [(0, 3, 2.0), (1, 17, 5.0), None, (0, 9, 0.5)]
    together = search.concept_probabilities(model, rows, ids, entries, positions=200)  # two copies a pass
    for entry, p in zip(entries, together):
        with neurons.steering_rows(model, [entry]):
            probs = model.logits(rows[:, :-1]).softmax(-1)[..., ids].sum(-1)
        assert p == pytest.approx(probs.mean().item(), rel=1e-4)
        strided, = search.concept_probabilities(model, rows, ids, [entry], stride=3)
        assert strided == pytest.approx(probs[:, 2::3].mean().item(), rel=1e-4)  # every third position
    assert len(set(together)) == len(entries)
