"""analysis.py and entropy.py: entropies, semantic clusters, neuron pages, one neuron as text,
and entropy across checkpoints end to end on the tiny runs."""
import html
import json
import math

import pytest
import torch

from conftest import tokens_of
from toolkit import analysis
from toolkit.common import load_checkpoint, load_model
from toolkit.data import decode
from toolkit.neurons import collect, load_eval_tokens


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


def test_neuron_page_shows_contexts_escaped(tiny_model, tmp_path):
    model = tiny_model()
    tokens = torch.tensor(tokens_of(['Anna <b>said</b> the job & the salary were fine.'] * 30)[:4 * 32]).view(4, 32)
    cluster_of = analysis.semantic_clusters(model.transformer.wte.weight, tokens, 4, seed=0)
    stats, tables = analysis.analyse(model, tokens, [0], 4, cluster_of)
    path = tmp_path / 'page.html'
    analysis.write_page(str(path), model, tokens, 0, stats[0], tables[0])
    page = path.read_text()
    j = analysis.specificity_order(tables[0])[0]
    firing = decode([tokens.flatten()[stats[0]['positions'][0, j]]])
    assert f'neuron 0:{j}' in page and f'class=f title="{stats[0]["values"][0, j]:.3f}"' in page
    assert html.escape(firing) in page
    assert '&lt;' in page and '<b>said' not in page and '<script' not in page  # no external or raw code
    assert '&amp;' in page


# -----------------------------------------------------------------------------
# the scripts, end to end, on a TopK run and its dense twin trained here for a few steps


def test_entropy_py_traces_every_checkpoint_and_agrees_with_analyse(copied_runs, run_main):
    out = copied_runs / 'topk'
    run_main('toolkit.entropy', f'--out_dir={out}', f'--compare={copied_runs / "dense"}', '--eval_tokens=2048',
             '--top_m=8', '--n_clusters=8')
    result = json.loads((out / 'analysis' / 'entropy.json').read_text())
    topk, dense = result['runs']['topk']['checkpoints'], result['runs']['dense']['checkpoints']
    assert [c['iter'] for c in topk] == [0, 4, 8] and [c['iter'] for c in dense] == [0, 4, 8]
    assert [c['alpha'] for c in topk] == [1.0, pytest.approx(1 / 3), 0.0]
    final = topk[-1]['layers']
    assert [x['topk'] for x in final] == [True, True, False] and not any(x['topk'] for x in dense[-1]['layers'])
    # the final checkpoint's numbers are analyse()'s, on the same tokens and clusters
    model, ckpt = load_model(str(out))
    tokens = load_eval_tokens(ckpt['config']['data_dir'], 2048, 32)
    cluster_of = analysis.semantic_clusters(load_checkpoint(str(out))['model']['transformer.wte.weight'], tokens, 8, 1337)
    _, tables = analysis.analyse(model, tokens, [0, 1, 2], 8, cluster_of)
    for x, t in zip(final, tables.values()):
        assert x['token_entropy_mean'] == pytest.approx(analysis.mean_over_firing(t['h_tok']))
        assert x['semantic_entropy_mean'] == pytest.approx(analysis.mean_over_firing(t['h_sem']))
        assert x['dead_fraction'] == pytest.approx(t['dead'].float().mean().item())
    for name in ('entropy_final.png', 'entropy_vs_step.png', 'neuron_formation.png',
                 'neurons_layer0.html', 'neurons_layer1.html'):
        assert (out / 'analysis' / name).stat().st_size > 0, name
    assert not (out / 'analysis' / 'neurons_layer2.html').exists()


def test_every_checkpoint_of_a_run_is_clustered_in_its_final_embedding(tiny_runs, tmp_path):
    final = load_checkpoint(str(tiny_runs / 'topk'))['model']['transformer.wte.weight']
    early = load_checkpoint(str(tiny_runs / 'topk' / 'ckpt_000000.pt'))['model']['transformer.wte.weight']
    assert not torch.equal(early, final)  # trained in between
    assert torch.equal(analysis.reference_wte(str(tiny_runs / 'topk' / 'ckpt_000000.pt')), final)
    assert torch.equal(analysis.reference_wte(str(tiny_runs / 'topk')), final)
    assert torch.equal(analysis.reference_wte(str(tiny_runs / 'topk'), str(tiny_runs / 'topk' / 'ckpt_000000.pt')), early)
    alone = tmp_path / 'snapshot.pt'  # a checkpoint with no run beside it is its own reference
    alone.write_bytes((tiny_runs / 'topk' / 'ckpt_000000.pt').read_bytes())
    assert torch.equal(analysis.reference_wte(str(alone)), early)


def test_analysis_prints_one_neuron_with_its_contexts(tiny_runs, run_main):
    model, ckpt = load_model(str(tiny_runs / 'topk'))
    stats = collect(model, load_eval_tokens(ckpt['config']['data_dir'], 2048, 32), [0], top_m=32)
    j = int(stats[0]['fires'].argmax())
    printed = run_main('toolkit.analysis', f'--out_dir={tiny_runs / "topk"}', f'--neuron=0:{j}', '--eval_tokens=2048')
    assert printed.startswith(f'layer 0 neuron {j}:') and 'promotes:' in printed
    contexts = printed.splitlines()[2:]
    assert len(contexts) == 8 and all('[[' in line and ']]' in line for line in contexts)  # the firing token marked
    assert float(contexts[0].split()[0]) == pytest.approx(stats[0]['values'][0, j].item(), abs=1e-3)
