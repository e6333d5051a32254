"""Tests of analysis.py, steer.py and entropy.py on tiny models (pytest test_analysis.py)."""
import json
import math
import os
import random
import runpy
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

import analysis
import steer
from common import EOT, encode, save_checkpoint, write_shard
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))

WORDS = {'work': 'job office salary manager boss desk'.split(), 'food': 'soup bread oven salt butter rice'.split()}


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine waiting for a second one
    costs more than each operation itself; restored for other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(topk=8, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=3, n_head=2, n_embd=32, topk=topk, n_nontopk=1))
    return model.eval()


def text(n_docs, seed):
    """Documents on one topic each, like the toy corpus: the topic shows only in its words."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = WORDS[rng.choice(sorted(WORDS))]
        docs.append(' '.join(f"{rng.choice(['Anna', 'Ben', 'Tom'])} saw the {rng.choice(words)} and the "
                             f"{rng.choice(words)}." for _ in range(rng.randint(2, 5))))
    return docs


def tokens_of(docs):
    return [t for d in docs for t in [EOT] + encode(d)]


def test_capture_is_the_activation_the_mlp_uses():
    model = tiny_model()
    x = torch.randint(0, 1000, (2, 16))
    mlp_io = {}
    hooks = [b.mlp.register_forward_hook(lambda m, i, o, l=l: mlp_io.__setitem__(l, (i[0], o)))
             for l, b in enumerate(model.transformer.h)]
    with analysis.capture(model, [0, 2]) as captured:
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


def test_collect_streams_the_exact_top_m():
    model = tiny_model()
    tokens = torch.randint(0, 1000, (7, 32))
    stats = analysis.collect(model, tokens, [0, 2], top_m=5, batch_size=2)
    with analysis.capture(model, [0, 2]) as captured:
        model(tokens)
    for l in (0, 2):
        a = captured[l].flatten(0, 1)
        s = stats[l]
        torch.testing.assert_close(s['values'], a.topk(5, dim=0).values, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.gather(0, s['positions']), s['values'], rtol=0, atol=1e-6)
        assert torch.equal(s['fires'], (a > 0).sum(0).float()) and s['n_tokens'] == tokens.numel()
    assert s['topk'] is False and stats[0]['topk'] is True


def inactive_neuron(model, x, layer):
    with analysis.capture(model, [layer]) as captured:
        model(x)
    return int((captured[layer].flatten(0, 1) == 0).all(0).nonzero()[0])


def test_steering_an_inactive_neuron_to_zero_changes_nothing():
    model, x = tiny_model(), torch.randint(0, 1000, (2, 16))
    j = inactive_neuron(model, x, 1)
    with analysis.steering(model, 1, j, None):  # steer.py's baseline: the same hooked path, unchanged
        base, _ = model(x)
    with analysis.steering(model, 1, j, 0.0):
        steered, _ = model(x)
    assert torch.equal(base, steered)
    torch.testing.assert_close(base, model(x)[0], rtol=0, atol=1e-5)  # = the unhooked (sparse) forward


def test_steering_shifts_the_mlp_output_by_v_times_the_decoder_column():
    model, x, v = tiny_model(), torch.randint(0, 1000, (2, 16)), 3.5
    mlp = model.transformer.h[0].mlp
    j = inactive_neuron(model, x, 0)
    outs = []
    hook = mlp.register_forward_hook(lambda m, i, o: outs.append(o))
    with analysis.capture(model, [0]):
        model(x)
    with analysis.steering(model, 0, j, v):
        model(x)
    hook.remove()
    shift = outs[1] - outs[0]
    torch.testing.assert_close(shift, (v * mlp.c_proj.weight[:, j]).expand_as(shift), rtol=0, atol=1e-5)


def concept_setup():
    """A tiny model, work/food text, and the token ids of the work words (the concept)."""
    model = tiny_model()
    tokens = torch.tensor(tokens_of(text(40, seed=3))[:8 * 32]).view(8, 32)
    return model, tokens, [encode(' ' + w)[0] for w in WORDS['work']]


def concept_stats(model, tokens, ids):
    return analysis.collect(model, tokens, [0, 1], top_m=4, marks=analysis.concept_marks(tokens, ids))


def test_reads_is_mean_on_the_concept_minus_mean_elsewhere_over_the_max():
    model, tokens, ids = concept_setup()
    with analysis.capture(model, [1]) as captured:
        model(tokens)
    a = captured[1].flatten(0, 1).clamp(min=0)
    on = torch.isin(tokens.flatten(), torch.tensor(ids))
    expected = (a[on].mean(0) - a[~on].mean(0)) / a.max(0).values.clamp(min=1e-9)
    torch.testing.assert_close(analysis.reads(concept_stats(model, tokens, ids)[1]), expected, rtol=1e-5, atol=1e-6)


def test_concept_marks_flag_the_concept_and_the_position_before_it():
    tokens = torch.tensor([[7, 1, 7, 2], [1, 1, 3, 7]])
    marks = analysis.concept_marks(tokens, [7])
    assert marks['concept'].tolist() == [[True, False, True, False], [False, False, False, True]]
    assert marks['next_is_concept'].tolist() == [[False, True, False, False], [False, False, True, False]]


def plant_reader(model, layer, j, token):
    """Make neuron j of a block fire on `token` alone: the token's embedding gets a long random
    direction u, which the residual stream carries into the MLP, the neuron's encoder row is u, and
    a negative bias keeps it off where attention has mixed only a little u into other positions."""
    u = F.normalize(torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():
        model.transformer.wte.weight[token] = 3 * u
        model.transformer.h[layer].mlp.c_fc.weight[j] = 3 * (u - u.mean())
        model.transformer.h[layer].mlp.c_fc.bias[j] = -8.0


def test_predicts_finds_a_neuron_that_fires_just_before_the_concept():
    model, X, C, j = tiny_model(), 5000, 6000, 40
    plant_reader(model, 0, j, X)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 1000, (8, 32), generator=g)
    tokens[:, 5::8], tokens[:, 6::8] = X, C  # the concept C always follows X
    stats = analysis.collect(model, tokens, [0], top_m=4, marks=analysis.concept_marks(tokens, [C]))
    assert int(analysis.predicts(stats[0]).argmax()) == j
    assert int(analysis.reads(stats[0]).argmax()) != j  # it does not fire on the concept itself


def test_writes_finds_a_decoder_column_set_to_the_concept_unembedding():
    model, C, j = tiny_model(), 6000, 77
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[:, j] = 0.5 * model.lm_head.weight[C]
    score = analysis.writes(model, 1, [C])
    assert int(score.argmax()) == j and score[j] > 3  # standard deviations above the average token


def test_concept_candidates_rank_the_neuron_that_promotes_the_concept_first():
    model, tokens, ids = concept_setup()
    # plant a neuron of layer 1 whose decoder column is ' salary''s (tied) embedding, made long
    # enough that writing it into the residual stream makes ' salary' the likeliest next token
    j, u = 17, F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        model.transformer.wte.weight[ids[2]] = 3 * u
        model.transformer.h[1].mlp.c_proj.weight[:, j] = 10 * u
    stats = concept_stats(model, tokens, ids)
    found = analysis.concept_candidates(model, stats, ids, tokens, lambda peak: 5.0, 4)
    best = found[0]
    assert (best['layer'], best['neuron']) == (1, j) and best['probability'] > 0.5
    assert 'writes' in best['signals']  # found by its decoder direction, whatever it reads
    assert best['scores']['reads'] == pytest.approx(analysis.reads(stats[1])[j].item())
    assert [c['probability'] for c in found] == sorted((c['probability'] for c in found), reverse=True)
    # with one candidate per signal, only each layer's best neuron by each signal is tried
    found = analysis.concept_candidates(model, stats, ids, tokens, lambda peak: 5.0, 1)
    for c in found:
        tops = {int(analysis.reads(stats[c['layer']]).argmax()), int(analysis.predicts(stats[c['layer']]).argmax()),
                int(analysis.writes(model, c['layer'], ids).argmax())}
        assert c['neuron'] in tops


def test_fluency_is_exp_of_the_mean_next_token_loss_of_the_continuation():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompt, continuations = [EOT], torch.randint(0, 1000, (3, 12), generator=g)
    ppl = steer.continuation_perplexity(model, prompt, continuations)
    for row, p in zip(continuations, ppl):
        seq = torch.tensor([prompt + row.tolist()])
        _, loss = model(seq[:, :-1], seq[:, 1:])  # with a one-token prompt, every target is the continuation's
        assert p.item() == pytest.approx(math.exp(loss.item()), rel=1e-5)
    # a longer prompt conditions the continuation but is not scored itself
    prompt = [EOT] + encode(' Anna saw the job')
    seq = torch.tensor([prompt + continuations[0].tolist()])
    logits, _ = model(seq[:, :-1], seq[:, 1:])
    loss = F.cross_entropy(logits[0, len(prompt) - 1:], seq[0, len(prompt):])
    assert steer.continuation_perplexity(model, prompt, continuations[:1])[0].item() == pytest.approx(
        math.exp(loss.item()), rel=1e-5)


def test_steered_samples_are_scored_by_the_unsteered_model():
    model, prompt_ids, j = tiny_model(), [[EOT] + encode(' Anna saw')], 5
    settings = dict(num_samples=3, max_new_tokens=6, temperature=1.0, top_k=0, seed=0)
    base, sweep = steer.steer_and_score(model, 0, j, [8.0], None, prompt_ids, None, settings)
    continuations = sweep[0]['continuations'][0]
    unsteered = steer.continuation_perplexity(model, prompt_ids[0], continuations).mean().item()
    assert sweep[0]['ppl'] == pytest.approx(unsteered, rel=1e-6)
    with analysis.steering(model, 0, j, 8.0):  # what scoring under the steered model would give instead
        assert steer.continuation_perplexity(model, prompt_ids[0], continuations).mean().item() != pytest.approx(
            unsteered, rel=1e-3)
    assert base['hit_rate'] is None and not torch.equal(base['continuations'][0], continuations)


def test_the_sweep_keeps_the_best_hit_rate_among_fluent_strengths():
    row = lambda scale, hit_rate, ppl: dict(scale=scale, hit_rate=hit_rate, ppl=ppl)
    sweep = [row(0.5, 0.2, 10), row(1, 0.6, 15), row(2, 0.6, 19), row(4, 1.0, 41)]
    assert steer.pick_scale(sweep, baseline_ppl=10)['scale'] == 1  # 4 is beyond 2x; a tie keeps the gentler
    assert steer.pick_scale(sweep, baseline_ppl=25)['scale'] == 4  # within 2x now
    assert steer.pick_scale(sweep, baseline_ppl=10, max_ratio=1.2)['scale'] == 0.5
    assert steer.pick_scale(sweep[1:], baseline_ppl=5)['scale'] == 1  # none within 2x: the most fluent
    no_concept = [dict(r, hit_rate=None) for r in sweep]
    assert steer.pick_scale(no_concept, baseline_ppl=10)['scale'] == 2  # no hit rates: the strongest fluent


def test_the_finalists_are_each_layers_best_then_the_next_best():
    found = [dict(layer=l, neuron=j) for l, j in [(0, 5), (0, 6), (2, 1), (0, 7), (1, 3)]]  # best first
    pick = lambda n: [(c['layer'], c['neuron']) for c in steer.pick_finalists(found, n)]
    assert pick(3) == [(0, 5), (2, 1), (1, 3)]
    assert pick(4) == [(0, 5), (2, 1), (1, 3), (0, 6)]
    assert pick(2) == [(0, 5), (2, 1)]


def test_the_finalist_kept_is_the_fluent_one_with_the_best_hit_rate():
    base = dict(ppl=10)
    row = lambda hit_rate, ppl: dict(hit_rate=hit_rate, ppl=ppl)
    assert steer.pick_finalist([(base, row(0.9, 30)), (base, row(0.5, 12))]) == 1  # 0.9 is not fluent
    assert steer.pick_finalist([(base, row(0.5, 12)), (base, row(0.7, 19))]) == 1
    assert steer.pick_finalist([(base, row(0.7, 12)), (base, row(0.7, 11))]) == 0  # a tie: the trial's order
    assert steer.pick_finalist([(base, row(0.9, 50)), (dict(ppl=20), row(0.2, 45))]) == 1  # none fluent: least ratio


def test_entropy_of_uniform_and_single_token():
    for n in (1, 2, 5, 8):
        labels = torch.tensor([[i, 7] for i in range(n)])  # column 0 uniform over n, column 1 one token
        h = analysis.column_entropy(labels, torch.ones_like(labels, dtype=torch.bool))
        assert math.isclose(h[0].item(), math.log2(n), abs_tol=1e-6) and h[1].item() == 0
    labels = torch.tensor([[1, 1], [2, 1], [3, 1], [3, 1]])
    valid = torch.tensor([[True, False], [True, False], [False, False], [False, False]])
    h = analysis.column_entropy(labels, valid)  # invalid entries are not counted; none at all: nan
    assert math.isclose(h[0].item(), 1.0, abs_tol=1e-6) and math.isnan(h[1].item())


def test_semantic_clusters_are_deterministic_and_separate_clear_groups():
    g = torch.Generator().manual_seed(0)
    wte = torch.randn(100, 16, generator=g)
    wte[:50] += 5 * torch.nn.functional.one_hot(torch.tensor(0), 16)  # two directions
    wte[50:] += 5 * torch.nn.functional.one_hot(torch.tensor(1), 16)
    tokens = torch.arange(100).view(4, 25)
    a = analysis.semantic_clusters(wte, tokens, 2, seed=3)
    assert torch.equal(a, analysis.semantic_clusters(wte, tokens, 2, seed=3))
    assert len(set(a[:50].tolist())) == 1 and len(set(a[50:].tolist())) == 1 and a[0] != a[50]
    assert (analysis.semantic_clusters(wte, tokens[:2], 2, seed=3)[50:] == -1).all()  # unseen: none


def test_neuron_page_shows_contexts_escaped(tmp_path):
    model = tiny_model()
    tokens = torch.tensor(tokens_of(['Anna <b>said</b> the job & the salary were fine.'] * 30)[:4 * 32]).view(4, 32)
    cluster_of = analysis.semantic_clusters(model.transformer.wte.weight, tokens, 4, seed=0)
    stats, tables = analysis.analyse(model, tokens, [0], 4, cluster_of)
    path = tmp_path / 'page.html'
    analysis.write_page(str(path), model, tokens, 0, stats[0], tables[0])
    page = path.read_text()
    j = analysis.specificity_order(tables[0])[0]
    firing = analysis.decode([tokens.flatten()[stats[0]['positions'][0, j]]])
    assert f'neuron 0:{j}' in page and f'class=f title="{stats[0]["values"][0, j]:.3f}"' in page
    assert analysis.html.escape(firing) in page
    assert '&lt;' in page and '<b>said' not in page and '<script' not in page  # no external or raw code
    assert '&amp;' in page


# -----------------------------------------------------------------------------
# the scripts, end to end, on a TopK run and its dense twin trained here for a few steps

def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                          text=True, env=env, cwd=HERE, timeout=300)


def train_tiny(out_dir, data_dir, topk, train_tokens, max_iters=8, every=4):
    """A few plain SGD steps of a tiny model, saved as train.py saves them (ckpt_{iter}.pt series
    and ckpt.pt, with model_args and config), alpha annealed over the first 3/4."""
    model = tiny_model(topk=topk).train()
    model_args = {k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias',
                                                        'vocab_size', 'dropout', 'topk', 'n_nontopk')}
    config = dict(data_dir=str(data_dir), annealing_ratio=0.75, max_iters=max_iters, topk=topk)
    g = torch.Generator().manual_seed(0)
    for it in range(max_iters + 1):
        model.set_alpha(max(0.0, 1 - it / (0.75 * max_iters)))
        if it % every == 0:
            ckpt = dict(model=model.state_dict(), model_args=model_args, iter_num=it, config=config)
            save_checkpoint(ckpt, os.path.join(out_dir, f'ckpt_{it:06d}.pt'))
        if it == max_iters:
            save_checkpoint(ckpt, os.path.join(out_dir, 'ckpt.pt'))
            break
        starts = torch.randint(0, len(train_tokens) - 33, (4,), generator=g)
        xy = torch.stack([train_tokens[s:s + 33] for s in starts])
        _, loss = model(xy[:, :-1], xy[:, 1:])
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    data = root / 'data'
    write_shard(str(data / 'tiny_val_000000.bin'), tokens_of(text(150, seed=1)))
    train_tokens = torch.tensor(tokens_of(text(300, seed=2)))
    write_shard(str(data / 'tiny_train_000001.bin'), train_tokens.numpy())  # what sae.py trains on
    train_tiny(root / 'topk', data, 8, train_tokens)
    train_tiny(root / 'dense', data, 0, train_tokens)
    return root


def test_steer_end_to_end(runs, tmp_path):
    r = run('steer.py', f'--out_dir={runs / "topk"}', '--concept=job office salary', '--num_samples=2',
            '--max_new_tokens=8', '--prompts=The|Anna saw', '--eval_tokens=2048', '--scales=1,3', '--plot=True')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert {'layer', 'neuron', 'value', 'baseline_hit_rate', 'steered_hit_rate', 'baseline_ppl', 'steered_ppl',
            'scale', 'signals', 'sweep', 'finalists'} == set(result)
    assert len(result['finalists']) == 3 and f"{result['layer']}:{result['neuron']}" in result['finalists']
    assert result['layer'] in (0, 1) and 0 <= result['baseline_hit_rate'] <= 1 and result['value'] > 0
    assert [s['scale'] for s in result['sweep']] == [1, 3] and result['scale'] in (1, 3)
    assert set(result['signals']) <= {'reads', 'predicts', 'writes'} and result['signals']
    assert result['baseline_ppl'] > 1 and result['steered_ppl'] > 1
    assert sum(line.startswith('--- prompt') for line in lines) == 4
    assert (runs / 'topk' / 'analysis' / f"steering_{result['layer']}_{result['neuron']}.png").stat().st_size > 0
    r = run('steer.py', f'--out_dir={runs / "topk"}', '--layer=2', '--neuron=5', '--value=2.5',
            '--num_samples=1', '--max_new_tokens=3', '--prompts=The')
    assert r.returncode == 0, r.stderr
    assert 'dense GELU block' in r.stdout
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert (result['layer'], result['neuron'], result['value'], result['baseline_hit_rate']) == (2, 5, 2.5, None)


@pytest.mark.parametrize('bad', ['--layer=3', '--neuron=128', '--neuron=-1', '--prompts=The| ', '--max_new_tokens=0',
                                 '--scales=1,x'])
def test_steer_rejects_bad_flags_in_one_line(runs, bad, monkeypatch):
    # in-process (runpy) to save an interpreter start per case; die() raises SystemExit
    monkeypatch.setattr(sys, 'argv', ['steer.py', f'--out_dir={runs / "topk"}', '--layer=0', '--neuron=1', bad])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(HERE, 'steer.py'), run_name='__main__')
    message = str(e.value)
    assert message.startswith(f"error: {bad.split('=')[0]}") and '\n' not in message, message
    if 'layer' in bad or 'neuron' in bad:
        assert ('[0, 2]' if 'layer' in bad else '[0, 127]') in message  # the valid range


def test_entropy_and_neuron_text_end_to_end(runs):
    out = runs / 'topk'
    r = run('entropy.py', f'--out_dir={out}', f'--compare={runs / "dense"}', '--eval_tokens=2048',
            '--top_m=8', '--n_clusters=8')
    assert r.returncode == 0, r.stderr
    result = json.loads((out / 'analysis' / 'entropy.json').read_text())
    topk, dense = result['runs']['topk']['checkpoints'], result['runs']['dense']['checkpoints']
    assert [c['iter'] for c in topk] == [0, 4, 8] and [c['iter'] for c in dense] == [0, 4, 8]
    assert [c['alpha'] for c in topk] == [1.0, pytest.approx(1 / 3), 0.0]
    final = topk[-1]['layers']
    assert [x['topk'] for x in final] == [True, True, False] and not any(x['topk'] for x in dense[-1]['layers'])
    for x in final:
        assert 0 <= x['token_entropy_mean'] <= 3 and 0 <= x['semantic_entropy_mean'] <= x['token_entropy_mean'] + 1e-6
        assert 0 <= x['dead_fraction'] <= 1
    for name in ('entropy_final.png', 'entropy_vs_step.png', 'neuron_formation.png',
                 'neurons_layer0.html', 'neurons_layer1.html'):
        assert (out / 'analysis' / name).stat().st_size > 0, name
    assert not (out / 'analysis' / 'neurons_layer2.html').exists()
    r = run('analysis.py', f'--out_dir={out}', '--neuron=0:3', '--eval_tokens=2048')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('layer 0 neuron 3:') and 'promotes:' in r.stdout


def run_in_process(monkeypatch, capsys, script, *args):
    """A script's main run here (no interpreter start per run); returns what it printed."""
    monkeypatch.setattr(sys, 'argv', [script, *args])
    runpy.run_path(os.path.join(HERE, script), run_name='__main__')
    return capsys.readouterr().out


def test_sae_then_its_latents_on_a_page_and_steered_end_to_end(runs, monkeypatch, capsys):
    dense, topk = runs / 'dense', runs / 'topk'
    run_in_process(monkeypatch, capsys, 'sae.py', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=2048',
                   '--batch_size=256', '--eval_tokens=512', '--top_m=4', '--n_clusters=4')
    result = json.loads((dense / 'sae' / 'comparison.json').read_text())
    assert set(result['routes']) == {'TopK LM neurons', 'dense twin neurons', 'dense + sae', 'dense + transcoder'}
    for kind in ('sae', 'transcoder'):
        route = result['routes'][f'dense + {kind}']
        assert set(route['layers']) == {'0', '1'} and route['training']['tokens'] == 2048  # 8 steps of 8 x 32 tokens
        for v in route['layers'].values():
            assert v['fvu'] >= 0 and 0 < v['l0'] <= 8 and v['ce_zero'] > 0 and math.isfinite(v['loss_recovered'])
    assert set(result['stability']['seeds']) == set(result['stability']['near_initialisation']) == {'0', '1'}
    assert result['stability']['checkpoints']['dense_iters'] == [4, 8]  # the snapshot nearest 60% of 8 steps
    assert (dense / 'sae' / 'comparison.png').stat().st_size > 0
    assert sorted(p.name for p in (dense / 'sae').glob('*.pt')) == sorted(
        f'{name}_layer{l}{suffix}.pt' for l in (0, 1) for name, suffix in
        [('sae', ''), ('sae', '_seed1'), ('sae', '_iter4'), ('transcoder', '')])
    # a second run reuses what is trained alike, and trains again what is not
    printed = run_in_process(monkeypatch, capsys, 'sae.py', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=2048',
                             '--batch_size=256', '--eval_tokens=512', '--top_m=4', '--n_clusters=4', '--stability=False')
    assert 'training it again' not in printed and json.loads((dense / 'sae' / 'comparison.json').read_text())[
        'routes']['dense + sae']['training'] == result['routes']['dense + sae']['training']
    printed = run_in_process(monkeypatch, capsys, 'sae.py', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=1024',
                             '--batch_size=256', '--eval_tokens=512', '--top_m=4', '--n_clusters=4', '--stability=False',
                             '--kind=transcoder', '--layer=1')
    assert printed.count('training it again') == 1 and 'transcoder_layer1.pt was trained with other settings' in printed
    assert set(json.loads((dense / 'sae' / 'comparison.json').read_text())['routes']['dense + transcoder']['layers']) == {'1'}

    # the same analysis and steering code reads a dictionary's latents
    printed = run_in_process(monkeypatch, capsys, 'analysis.py', f'--out_dir={dense}',
                             f"--dictionary={dense / 'sae' / 'sae_layer1.pt'}", '--eval_tokens=2048')
    page = (dense / 'analysis' / 'sae_layer1.html').read_text()
    assert 'SAE (k = 8)' in page and 'neuron 1:' in page
    printed = run_in_process(monkeypatch, capsys, 'steer.py', f'--out_dir={dense}', '--concept=job office salary',
                             f"--dictionary={dense / 'sae' / 'transcoder_layer0.pt'}", '--num_samples=2',
                             '--max_new_tokens=8', '--prompts=The', '--scales=1,2', '--eval_tokens=1024')
    result = json.loads(printed.strip().splitlines()[-1])
    assert result['layer'] == 0 and 0 <= result['neuron'] < 128 and result['steered_ppl'] > 1
