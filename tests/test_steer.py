"""steer.py and toolkit/sweep.py: the scoring of steered samples, the choice of strength (refined
where fluency breaks) and of finalist, and the script end to end on the tiny runs."""
import ast
import inspect
import json
import math
import re

import pytest
import torch
from torch.nn import functional as F

from toolkit import neurons
from toolkit.data import EOT, encode
from toolkit.sweep import (continuation_perplexity, hit_pattern, pick_finalist, pick_scale, qualities, sample_sets,
                           steer_concept, sweep_finalists, sweep_plan)


def test_fluency_is_exp_of_the_mean_next_token_loss_of_the_continuation(tiny_model):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompt, continuations = [EOT], torch.randint(0, 1000, (3, 12), generator=g)
    ppl = continuation_perplexity(model, prompt, continuations)
    for row, p in zip(continuations, ppl):
        seq = torch.tensor([prompt + row.tolist()])
        _, loss = model(seq[:, :-1], seq[:, 1:])  # with a one-token prompt, every target is the continuation's
        assert p.item() == pytest.approx(math.exp(loss.item()), rel=1e-5)
    # a longer prompt conditions the continuation but is not scored itself
    prompt = [EOT] + encode(' Anna saw the job')
    seq = torch.tensor([prompt + continuations[0].tolist()])
    logits, _ = model(seq[:, :-1], seq[:, 1:])
    loss = F.cross_entropy(logits[0, len(prompt) - 1:], seq[0, len(prompt):])
    assert continuation_perplexity(model, prompt, continuations[:1])[0].item() == pytest.approx(
        math.exp(loss.item()), rel=1e-5)


def test_the_hit_rate_is_the_share_of_continuations_with_a_concept_word_in_any_case(tiny_model):
    labelled = [(' The job', ' went well', False),  # in the prompt only: not counted
                (' Anna', ' found a job.', True), (' Anna', ' lost her JOB', True),
                (' Anna', ' had two jobs', False),  # a longer word, not the concept's
                (' Anna', ' left the office', True)]
    prompt_ids = [[EOT] + encode(prompt) for prompt, _, _ in labelled]
    continuations = [torch.tensor([encode(text)]) for _, text, _ in labelled]
    scored, = qualities(tiny_model(), prompt_ids, [continuations], hit_pattern(['job', 'office']))
    assert scored['hit_rate'] == pytest.approx(sum(hit for _, _, hit in labelled) / len(labelled))  # 3 / 5


def test_steered_samples_are_scored_by_the_unsteered_model(tiny_model):
    model, prompt_ids, j = tiny_model(), [[EOT] + encode(' Anna saw')], 5
    settings = dict(num_samples=3, max_new_tokens=6, temperature=1.0, top_k=0, seed=0)
    base, (sweep,) = sweep_finalists(model, [dict(layer=0, neuron=j, peak=None)], [8.0], prompt_ids, None, settings)
    continuations = sweep[0]['continuations'][0]
    unsteered = continuation_perplexity(model, prompt_ids[0], continuations).mean().item()
    assert sweep[0]['ppl'] == pytest.approx(unsteered, rel=1e-6)
    with neurons.steering(model, 0, j, 8.0):  # what scoring under the steered model would give instead
        assert continuation_perplexity(model, prompt_ids[0], continuations).mean().item() != pytest.approx(
            unsteered, rel=1e-3)
    assert base['hit_rate'] is None and not torch.equal(base['continuations'][0], continuations)


def scales_tried(plan, ppl):
    """Drive a sweep_plan with rows whose perplexity is ppl(scale); the scales of the sweep it returns."""
    s = next(plan)
    try:
        while True:
            s = plan.send(dict(scale=s, ppl=ppl(s)))
    except StopIteration as done:
        return [r['scale'] for r in done.value]


def test_a_concept_word_is_hit_as_a_whole_word_whatever_its_edge_characters():
    pattern = hit_pattern(['job', 'c++', 'u.s.'])
    assert [bool(pattern.search(text)) for text in ('a job.', 'Jobs', 'I like C++ a lot', 'in the U.S. today',
                                                    'abc++', 'jobless')] == [True, False, True, True, False, False]


def test_the_sweep_doubles_past_the_grid_while_fluent_up_to_max_scale():
    breaks_at_7 = lambda s: 5.0 if s < 7 else 20.0  # fluent (bound 10) below scale 7
    assert scales_tried(sweep_plan([1, 2], 10, 0, False, 16), breaks_at_7) == [1, 2, 4, 8]
    # then bisection between the last fluent doubling and the first that is not
    assert scales_tried(sweep_plan([1, 2], 10, 2, False, 16), breaks_at_7) == [1, 2, 4, 6, 7, 8]
    assert scales_tried(sweep_plan([1, 2], 10, 0, False, 16), lambda s: 5.0) == [1, 2, 4, 8, 16]  # the cap
    assert scales_tried(sweep_plan([1, 2], 10, 0, False, 0), lambda s: 5.0) == [1, 2]  # 0: the grid's top
    assert scales_tried(sweep_plan([0], 10, 0, False, 16), lambda s: 5.0) == [0]  # 0 doubles to 0: not again
    # a grid that breaks fluency before its top is not extended
    assert scales_tried(sweep_plan([1, 2, 8], 10, 0, True, 64), breaks_at_7) == [1, 2, 8]


def test_each_set_sampled_in_a_batch_is_the_set_it_gives_alone(tiny_model):
    model, prompt_ids = tiny_model(), [[EOT] + encode(' Anna saw'), [EOT]]
    settings = dict(num_samples=3, max_new_tokens=6, temperature=1.0, top_k=0, seed=0)
    entries = [None, (0, 5, 8.0), (1, 7, 4.0), (0, 5, 2.0)]
    together = sample_sets(model, prompt_ids, entries, **settings)
    for entry, sets in zip(entries, together):
        alone, = sample_sets(model, prompt_ids, [entry], **settings)
        assert all(torch.equal(a, b) for a, b in zip(sets, alone))
    assert not torch.equal(together[0][0], together[1][0])  # the steering shows


def test_a_sample_never_holds_a_padded_id_even_where_the_model_favours_one(tiny_model):
    model = tiny_model()  # its embedding padded past the tokenizer's 50,257 ids, as every run's
    padded = torch.arange(model.config.vocab_size) > EOT
    favour = model.lm_head.register_forward_hook(lambda m, i, out: out + 100 * padded)  # as a far-pushed neuron can
    sets, = sample_sets(model, [[EOT]], [None], num_samples=3, max_new_tokens=4, temperature=1.0, top_k=0, seed=0)
    favour.remove()
    assert (sets[0] <= EOT).all()


def test_finalists_swept_side_by_side_are_swept_as_alone(tiny_model):
    """The planted neuron (below) flips greedy tokens only when pushed hard: its sweep bisects
    where fluency (max_ratio 1 + 1e-6) breaks; a neuron of layer 0 that writes nothing stays
    fluent and is doubled to max_scale. Swept together, each gives the rows it gives alone."""
    model, j = planted_neuron(tiny_model())
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[:, 5] = 0
    prompt_ids = [[EOT] + encode(' Anna saw'), [EOT]]
    settings = dict(num_samples=2, max_new_tokens=6, temperature=0, top_k=0, seed=3)
    finalists = [dict(layer=1, neuron=j, peak=None), dict(layer=0, neuron=5, peak=None)]
    sweep_of = lambda fs: sweep_finalists(model, fs, [1e-4, 50.0], prompt_ids, None, settings, refine=3,
                                          max_ratio=1 + 1e-6, full_sweep=False, max_scale=400)
    base, sweeps = sweep_of(finalists)
    for f, sweep in zip(finalists, sweeps):
        base_alone, (alone,) = sweep_of([f])
        assert base['ppl'] == pytest.approx(base_alone['ppl'], rel=1e-5)
        assert [r['scale'] for r in sweep] == [r['scale'] for r in alone]
        assert all(torch.equal(r['continuations'][i], a['continuations'][i]) for r, a in zip(sweep, alone)
                   for i in range(2))
    assert len(sweeps[0]) == 5 and 1e-4 < sweeps[0][1]['scale'] < 50.0  # bisected
    assert [r['scale'] for r in sweeps[1]] == [1e-4, 50.0, 100.0, 200.0, 400.0]  # doubled


def test_the_sweep_keeps_the_best_hit_rate_among_fluent_strengths():
    row = lambda scale, hit_rate, ppl: dict(scale=scale, hit_rate=hit_rate, ppl=ppl)
    sweep = [row(0.5, 0.2, 10), row(1, 0.6, 15), row(2, 0.6, 19), row(4, 1.0, 41)]
    assert pick_scale(sweep, baseline_ppl=10)['scale'] == 1  # 4 is beyond 2x; a tie keeps the gentler
    assert pick_scale(sweep, baseline_ppl=25)['scale'] == 4  # within 2x now
    assert pick_scale(sweep, baseline_ppl=10, max_ratio=1.2)['scale'] == 0.5
    assert pick_scale(sweep[1:], baseline_ppl=5)['scale'] == 1  # none within 2x: the most fluent
    no_concept = [dict(r, hit_rate=None) for r in sweep]
    assert pick_scale(no_concept, baseline_ppl=10)['scale'] == 2  # no hit rates: the strongest fluent


def test_the_finalist_kept_is_the_fluent_one_with_the_best_hit_rate():
    base = dict(ppl=10)
    row = lambda hit_rate, ppl: dict(hit_rate=hit_rate, ppl=ppl)
    assert pick_finalist([(base, row(0.9, 30)), (base, row(0.5, 12))]) == 1  # 0.9 is not fluent
    assert pick_finalist([(base, row(0.5, 12)), (base, row(0.7, 19))]) == 1
    assert pick_finalist([(base, row(0.7, 12)), (base, row(0.7, 11))]) == 0  # a tie: the trial's order
    assert pick_finalist([(base, row(0.9, 50)), (dict(ppl=20), row(0.2, 45))]) == 1  # none fluent: least ratio


def test_steer_concept_has_the_command_lines_defaults(run_main):
    """sae.py calls steer_concept() for what `steer.py --concept` does: same defaults, no flags read."""
    # steer.py runs when imported: its defaults as its --help lists them (strings as their repr)
    shown = dict(re.findall(r"^  --(\w+)=('[^']*'|\S+)", run_main('steer.py', '--help'), re.M))
    flag = lambda k: ast.literal_eval(shown[k])
    flags = {'prompts': flag('prompts').split('|'), 'scales': [float(s) for s in flag('scales').split(',')],
             **{k: flag(k) for k in ('num_samples', 'max_new_tokens', 'temperature', 'top_k', 'seed', 'top_m',
                                     'candidates', 'n_finalists', 'max_ppl_ratio', 'refine', 'full_sweep',
                                     'batch_size', 'max_scale')}}
    defaults = {k: p.default for k, p in inspect.signature(steer_concept).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} == flags


# -----------------------------------------------------------------------------
# the script


def test_steer_searches_a_concept_and_sweeps_the_strength_end_to_end(copied_runs, run_main):
    topk = copied_runs / "topk"
    printed = run_main('steer.py', f'--out_dir={topk}', '--concept=job office salary', '--num_samples=2',
                       '--max_new_tokens=8', '--prompts=The|Anna saw', '--eval_tokens=2048', '--scales=1,3',
                       '--max_scale=0', '--plot=True')
    lines = printed.strip().splitlines()
    result = json.loads(lines[-1])
    assert {'layer', 'neuron', 'value', 'baseline_hit_rate', 'steered_hit_rate', 'baseline_ppl', 'steered_ppl',
            'scale', 'signals', 'sweep', 'finalists', 'seconds'} == set(result)
    assert set(result['seconds']) == {'load_and_search', 'steering'} and min(result['seconds'].values()) > 0
    assert len(result['finalists']) == 4 and f"{result['layer']}:{result['neuron']}" in result['finalists']
    assert result['layer'] in (0, 1)  # a TopK layer
    scales = [s['scale'] for s in result['sweep']]  # the grid 1, 3 (3 unless 1 broke fluency), bisections between
    assert scales[0] == 1 and scales == sorted(scales) and all(1 < s <= 3 for s in scales[1:])
    assert result['scale'] in scales
    kept = next(s for s in result['sweep'] if s['scale'] == result['scale'])
    assert (kept['hit_rate'], kept['ppl']) == (result['steered_hit_rate'], result['steered_ppl'])
    assert set(result['signals']) <= {'reads', 'predicts', 'writes'} and result['signals']
    assert sum(line.startswith('--- prompt') for line in lines) == 4
    assert (topk / 'analysis' / f"steering_{result['layer']}_{result['neuron']}.png").stat().st_size > 0


def test_steer_sets_a_given_neuron_to_an_absolute_value(tiny_runs, run_main):
    printed = run_main('steer.py', f'--out_dir={tiny_runs / "topk"}', '--layer=2', '--neuron=5', '--value=2.5',
                       '--num_samples=1', '--max_new_tokens=3', '--prompts=The')
    assert 'dense GELU block' in printed
    result = json.loads(printed.strip().splitlines()[-1])
    assert (result['layer'], result['neuron'], result['value'], result['baseline_hit_rate']) == (2, 5, 2.5, None)


def test_the_chosen_line_names_the_neuron_and_strength_when_none_is_fluent(tiny_runs, run_main):
    printed = run_main('steer.py', f'--out_dir={tiny_runs / "topk"}', '--layer=0', '--neuron=5', '--value=30',
                       '--num_samples=1', '--max_new_tokens=3', '--prompts=The', '--max_ppl_ratio=1e-9')
    chosen = next(line for line in printed.splitlines() if line.startswith('chosen:'))
    assert chosen == ("chosen: neuron 0:5 at value 30, no strength stayed within 1e-09x the baseline perplexity: "
                      "the most fluent")


def planted_neuron(model, j=17):
    """Neuron j of layer 1 made to push the residual stream towards ' salary' and never fire by
    itself; (model, j)."""
    X = encode(' salary')[0]
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[:, j] = F.normalize(model.lm_head.weight[X], dim=0)
        model.transformer.h[1].mlp.c_fc.bias[j] = -100.0
        model.transformer.ln_f.weight *= 50  # confident logits: a small push flips no greedy token
    return model, j


def test_refinement_bisects_between_the_grid_points_that_bracket_the_fluency_bound(tiny_model):
    """Greedy decoding makes the planted neuron's effect known: a steered continuation is the
    baseline's, at exactly the baseline's perplexity, until the value is large enough to flip a
    token. With max_ratio 1 + 1e-6 that flip is where fluency breaks, and bisection closes in on it."""
    model, j = planted_neuron(tiny_model())
    prompt_ids = [[EOT] + encode(' Anna saw')]
    settings = dict(num_samples=1, max_new_tokens=6, temperature=0, top_k=0, seed=0)
    base, (sweep,) = sweep_finalists(model, [dict(layer=1, neuron=j, peak=None)], [1e-4, 50.0], prompt_ids, None,
                                     settings, refine=4, max_ratio=1 + 1e-6)
    assert torch.equal(sweep[0]['continuations'][0], base['continuations'][0])  # 1e-4: no token flips
    assert not torch.equal(sweep[-1]['continuations'][0], base['continuations'][0])  # 50: some do
    refined = [r['scale'] for r in sweep[1:-1]]
    assert len(refined) == 4 and all(1e-4 < s < 50.0 for s in refined)
    fluent = [r for r in sweep if r['ppl'] <= (1 + 1e-6) * base['ppl']]
    lo, hi = max(r['scale'] for r in fluent), min(r['scale'] for r in sweep if r not in fluent)
    assert lo < hi <= lo + (50.0 - 1e-4) / 2 ** 4 + 1e-9  # the bracket halved at every step
    for r in sweep:  # fluent exactly where greedy decoding is unchanged
        assert (r in fluent) == torch.equal(r['continuations'][0], base['continuations'][0])
    assert pick_scale(sweep, base['ppl'], 1 + 1e-6)['scale'] == lo  # no concept: the strongest fluent


def test_the_sweep_stops_at_the_first_strength_past_the_fluency_bound_unless_asked_for_all(tiny_model):
    """The planted neuron of the test above: 1e-4 leaves greedy decoding unchanged, 50 flips tokens."""
    model, j = planted_neuron(tiny_model())
    prompt_ids = [[EOT] + encode(' Anna saw')]
    settings = dict(num_samples=1, max_new_tokens=6, temperature=0, top_k=0, seed=0)
    grid = [100.0, 1e-4, 50.0]  # in any order: tried from the weakest up
    target = dict(layer=1, neuron=j, peak=None)
    _, (stopped,) = sweep_finalists(model, [target], grid, prompt_ids, None, settings, max_ratio=1 + 1e-6,
                                    full_sweep=False)
    _, (full,) = sweep_finalists(model, [target], grid, prompt_ids, None, settings, max_ratio=1 + 1e-6)
    assert [r['scale'] for r in stopped] == [1e-4, 50.0] and [r['scale'] for r in full] == [1e-4, 50.0, 100.0]
    assert [r['ppl'] for r in stopped] == [r['ppl'] for r in full[:2]]  # the same rows, one fewer sampled
