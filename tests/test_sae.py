"""sae.py: the comparison of the post-hoc route end to end on the tiny runs, with its dictionaries
then read and steered by analysis.py and steer.py (test_dictionary.py tests the measurements)."""
import json
import math
import sys

import pytest

import toolkit


def test_sae_then_its_latents_on_a_page_and_steered_end_to_end(copied_runs, run_main):
    dense, topk = copied_runs / 'dense', copied_runs / 'topk'
    small = ['--trainer=own', '--batch_size=256', '--eval_tokens=512', '--top_m=4', '--n_clusters=4']
    run_main('toolkit.sae', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=2048', *small)
    result = json.loads((dense / 'sae' / 'comparison.json').read_text())
    assert set(result['routes']) == {'TopK LM neurons', 'dense twin neurons', 'dense + sae', 'dense + transcoder'}
    for kind in ('sae', 'transcoder'):
        route = result['routes'][f'dense + {kind}']
        assert set(route['layers']) == {'0', '1'} and route['training']['tokens'] == 2048  # 8 steps of 8 x 32 tokens
        for v in route['layers'].values():  # the share of the zero-ablation's loss that splicing recovers
            assert v['loss_recovered'] == pytest.approx((v['ce_zero'] - v['ce']) / (v['ce_zero'] - result['dense']['ce']))
            assert v['l0'] > 0 and math.exp(v['ce']) == pytest.approx(v['ppl'])
    assert set(result['stability']['seeds']) == set(result['stability']['near_initialisation']) == {'0', '1'}
    assert result['stability']['checkpoints']['dense_iters'] == [4, 8]  # the snapshot nearest 60% of 8 steps
    assert (dense / 'sae' / 'comparison.png').stat().st_size > 0
    assert sorted(p.name for p in (dense / 'sae').glob('*.pt')) == sorted(
        f'{name}_layer{l}{suffix}.pt' for l in (0, 1) for name, suffix in
        [('sae', ''), ('sae', '_seed1'), ('sae', '_iter4'), ('transcoder', '')])
    # a second run reuses what is trained alike, and trains again what is not
    printed = run_main('toolkit.sae', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=2048', *small, '--stability=False')
    assert 'training it again' not in printed and json.loads((dense / 'sae' / 'comparison.json').read_text())[
        'routes']['dense + sae']['training'] == result['routes']['dense + sae']['training']
    printed = run_main('toolkit.sae', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=1024', *small,
                       '--stability=False', '--kind=transcoder', '--layer=1')
    assert printed.count('training it again') == 1 and 'transcoder_layer1.pt was trained with other settings' in printed
    assert set(json.loads((dense / 'sae' / 'comparison.json').read_text())['routes']['dense + transcoder']['layers']) == {'1'}

    # the same analysis and steering code reads a dictionary's latents
    run_main('toolkit.analysis', f'--out_dir={dense}', f"--dictionary={dense / 'sae' / 'sae_layer1.pt'}", '--eval_tokens=2048')
    page = (dense / 'analysis' / 'sae_layer1.html').read_text()
    assert 'SAE (k = 8)' in page and 'neuron 1:' in page
    printed = run_main('steer.py', f'--out_dir={dense}', '--concept=job office salary',
                       f"--dictionary={dense / 'sae' / 'transcoder_layer0.pt'}", '--num_samples=2',
                       '--max_new_tokens=8', '--prompts=The', '--scales=1,2', '--eval_tokens=1024')
    result = json.loads(printed.strip().splitlines()[-1])
    assert result['layer'] == 0 and all(f.startswith('0:') for f in result['finalists'])  # the dictionary's layer only


def test_trainer_sparsify_without_sparsify_installed_says_what_to_install(copied_runs, run_main, monkeypatch):
    monkeypatch.setitem(sys.modules, 'toolkit.sparsify_train', None)  # as if it could not be imported
    monkeypatch.delattr(toolkit, 'sparsify_train', raising=False)  # nor found on the package, if it was
    with pytest.raises(SystemExit, match=r"--trainer=sparsify needs EleutherAI sparsify .*toolkit/requirements-interop.txt"):
        run_main('toolkit.sae', f"--out_dir={copied_runs / 'dense'}", f"--compare={copied_runs / 'topk'}")
