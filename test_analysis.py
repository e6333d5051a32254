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
    return analysis.collect(model, tokens, [0, 1], top_m=4, marked=torch.isin(tokens, torch.tensor(ids)))


def test_selectivity_is_mean_on_marked_minus_mean_elsewhere_over_the_max():
    model, tokens, ids = concept_setup()
    with analysis.capture(model, [1]) as captured:
        model(tokens)
    a = captured[1].flatten(0, 1).clamp(min=0)
    on = torch.isin(tokens.flatten(), torch.tensor(ids))
    expected = (a[on].mean(0) - a[~on].mean(0)) / a.max(0).values.clamp(min=1e-9)
    torch.testing.assert_close(analysis.selectivity(concept_stats(model, tokens, ids)[1]), expected,
                               rtol=1e-5, atol=1e-6)


def test_concept_neuron_picks_the_candidate_that_promotes_the_concept():
    model, tokens, ids = concept_setup()
    # plant a neuron of layer 1 whose decoder column is ' salary''s (tied) embedding, made long
    # enough that writing it into the residual stream makes ' salary' the likeliest next token
    j, u = 17, F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        model.transformer.wte.weight[ids[2]] = 3 * u
        model.transformer.h[1].mlp.c_proj.weight[:, j] = 10 * u
    stats = concept_stats(model, tokens, ids)
    p, layer, neuron, sel = analysis.concept_neuron(model, stats, ids, tokens, lambda peak: 5.0, 128)
    assert (layer, neuron) == (1, j) and p > 0.5
    assert sel == pytest.approx(analysis.selectivity(stats[1])[j].item())
    # with one candidate per layer, only each layer's most selective neuron is tried
    _, layer, neuron, _ = analysis.concept_neuron(model, stats, ids, tokens, lambda peak: 5.0, 1)
    assert neuron == int(analysis.selectivity(stats[layer]).argmax())


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
    train_tiny(root / 'topk', data, 8, train_tokens)
    train_tiny(root / 'dense', data, 0, train_tokens)
    return root


def test_steer_end_to_end(runs):
    r = run('steer.py', f'--out_dir={runs / "topk"}', '--concept=job office salary', '--num_samples=2',
            '--max_new_tokens=8', '--prompts=The|Anna saw', '--eval_tokens=2048')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {'layer', 'neuron', 'value', 'baseline_hit_rate', 'steered_hit_rate'}
    assert result['layer'] in (0, 1) and 0 <= result['baseline_hit_rate'] <= 1 and result['value'] > 0
    assert sum(line.startswith('--- prompt') for line in lines) == 4
    r = run('steer.py', f'--out_dir={runs / "topk"}', '--layer=2', '--neuron=5', '--value=2.5',
            '--num_samples=1', '--max_new_tokens=3', '--prompts=The')
    assert r.returncode == 0, r.stderr
    assert 'dense GELU block' in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        'layer': 2, 'neuron': 5, 'value': 2.5, 'baseline_hit_rate': None, 'steered_hit_rate': None}


@pytest.mark.parametrize('bad', ['--layer=3', '--neuron=128', '--neuron=-1', '--prompts=The| ', '--max_new_tokens=0'])
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
