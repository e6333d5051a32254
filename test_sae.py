"""sae.py: the measurements of the post-hoc route (splice cost, FVU, matching, distance from the
start), and the comparison end to end on the tiny runs, with its dictionaries then read and
steered by analysis.py and steer.py."""
import json
import math
import sys

import pytest
import torch
from torch.nn import functional as F

import dictionary
import sae
from conftest import TINY_DENSE, planted


def identity_coder(d_in, transcoder=False):
    """A dictionary that reconstructs any x exactly: latents relu(x) and relu(-x), decoded as
    relu(x) - relu(-x) = x (each sum has one non-zero term, so no rounding)."""
    coder = dictionary.SparseCoder(d_in, 2 * d_in, k=2 * d_in, transcoder=transcoder)
    eye = torch.eye(d_in)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.cat([eye, -eye]))
        coder.encoder.bias.zero_()
        coder.decoder.weight.copy_(torch.cat([eye, -eye], 1))
        coder.b_pre.zero_()
    return coder


def test_splicing_a_perfect_reconstruction_gives_the_clean_loss_exactly(tiny_model):
    model, tokens = tiny_model(**TINY_DENSE), torch.randint(0, 512, (4, 16))
    clean = sae.mean_ce(model, tokens)
    with dictionary.attached(model, {0: identity_coder(16), 1: identity_coder(16)}, splice=True):
        assert sae.mean_ce(model, tokens) == clean
    with sae.zeroed(model, [0, 1]):
        zero = sae.mean_ce(model, tokens)
    assert zero != clean
    costs = sae.splice_costs(model, {1: identity_coder(16)}, tokens, clean)
    assert costs[1]['loss_recovered'] == 1.0 and costs['all']['ce'] == clean
    assert sae.reconstruction(model, {0: identity_coder(16)}, tokens)[0] == pytest.approx(0, abs=1e-10)


def test_matching_a_dictionary_with_itself_shuffled_shares_everything():
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(16, 50, generator=g)
    order = torch.randperm(50, generator=g)
    shared, partner = sae.shared_fraction(dec, dec[:, order])
    assert shared == 1.0
    assert (order[torch.as_tensor(partner)] == torch.arange(50)).all()  # each element found its copy
    shared, _ = sae.shared_fraction(dec, torch.randn(16, 50, generator=g))
    assert shared < 0.2  # unrelated random directions rarely align


def test_initial_coders_rebuild_where_training_started_and_training_moves_away_from_it():
    a = dictionary.initial_coders(32, 64, 4, 'sae', 0, [0, 1, 2])
    b = dictionary.initial_coders(32, 64, 4, 'sae', 0, [1])  # layer 1 alone starts as it does beside 0 and 2
    torch.testing.assert_close(a[1].decoder.weight, b[1].decoder.weight, rtol=0, atol=0)
    assert sae.near_initialisation(a[1], b[1]) == 1.0
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(32, 64, generator=g), dim=0)
    trainer = dictionary.Trainer(a[1], lr=1e-2, dead_tokens=256 * 20)
    for _ in range(300):
        x = planted(256, directions, 4, g)
        trainer.step(x, x)
    assert sae.near_initialisation(a[1], b[1]) < 0.3  # it found the planted directions instead


def test_sae_then_its_latents_on_a_page_and_steered_end_to_end(copied_runs, run_main):
    dense, topk = copied_runs / 'dense', copied_runs / 'topk'
    small = ['--trainer=own', '--batch_size=256', '--eval_tokens=512', '--top_m=4', '--n_clusters=4']
    run_main('sae.py', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=2048', *small)
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
    printed = run_main('sae.py', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=2048', *small, '--stability=False')
    assert 'training it again' not in printed and json.loads((dense / 'sae' / 'comparison.json').read_text())[
        'routes']['dense + sae']['training'] == result['routes']['dense + sae']['training']
    printed = run_main('sae.py', f'--out_dir={dense}', f'--compare={topk}', '--n_tokens=1024', *small,
                       '--stability=False', '--kind=transcoder', '--layer=1')
    assert printed.count('training it again') == 1 and 'transcoder_layer1.pt was trained with other settings' in printed
    assert set(json.loads((dense / 'sae' / 'comparison.json').read_text())['routes']['dense + transcoder']['layers']) == {'1'}

    # the same analysis and steering code reads a dictionary's latents
    run_main('analysis.py', f'--out_dir={dense}', f"--dictionary={dense / 'sae' / 'sae_layer1.pt'}", '--eval_tokens=2048')
    page = (dense / 'analysis' / 'sae_layer1.html').read_text()
    assert 'SAE (k = 8)' in page and 'neuron 1:' in page
    printed = run_main('steer.py', f'--out_dir={dense}', '--concept=job office salary',
                       f"--dictionary={dense / 'sae' / 'transcoder_layer0.pt'}", '--num_samples=2',
                       '--max_new_tokens=8', '--prompts=The', '--scales=1,2', '--eval_tokens=1024')
    result = json.loads(printed.strip().splitlines()[-1])
    assert result['layer'] == 0 and all(f.startswith('0:') for f in result['finalists'])  # the dictionary's layer only


def test_trainer_sparsify_without_sparsify_installed_says_what_to_install(copied_runs, run_main, monkeypatch):
    monkeypatch.setitem(sys.modules, 'sparsify_train', None)  # as if it could not be imported
    with pytest.raises(SystemExit, match=r"--trainer=sparsify needs EleutherAI sparsify .*requirements-interop.txt"):
        run_main('sae.py', f"--out_dir={copied_runs / 'dense'}", f"--compare={copied_runs / 'topk'}")
