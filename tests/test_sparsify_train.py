"""sparsify_train.py: the post-hoc dictionaries trained by EleutherAI sparsify, converted exactly to
dictionary.py's coders, and sae.py --trainer=sparsify end to end on conftest's tiny runs."""
import json

import pytest
import torch

from conftest import import_or_skip  # the check comes before the optional imports
import_or_skip(("transformers", "sparsify"), "toolkit/requirements-interop.txt")

from datasets import Dataset  # noqa: E402
from sparsify import SparseCoder as SparsifyCoder  # noqa: E402 (after the check that it is installed)
from sparsify import SparseCoderConfig, TrainConfig, Trainer  # noqa: E402

from toolkit import interop  # noqa: E402
from toolkit import dictionary  # noqa: E402
from toolkit import sparsify_train  # noqa: E402
from toolkit.common import load_model  # noqa: E402


@pytest.mark.parametrize("transcode", [False, True])
def test_a_converted_coder_encodes_and_decodes_as_sparsify_does(transcode):
    torch.manual_seed(0)
    theirs = SparsifyCoder(16, SparseCoderConfig(num_latents=64, k=4, transcode=transcode))
    with torch.no_grad():  # every weight non-zero, b_dec too, so a misplaced one shows
        for p in theirs.parameters():
            p.normal_()
    ours = sparsify_train.converted(theirs, transcode)
    x = torch.randn(10, 16)
    code = theirs.encode(x)
    y, z, _ = ours(x)
    torch.testing.assert_close(z, torch.zeros(10, 64).scatter(-1, code.top_indices, code.top_acts))
    torch.testing.assert_close(y, theirs.decode(code.top_acts, code.top_indices))


def test_initial_coders_are_where_sparsifys_trainer_starts(tiny_runs):
    body = interop.to_hf(load_model(str(tiny_runs / 'dense'))[0]).transformer
    rows = Dataset.from_dict({'input_ids': torch.zeros(8, 32, dtype=torch.long).numpy()}).with_format('torch')
    cfg = TrainConfig(sparsify_train.sparsify_config(128, 8, 'sae'), batch_size=4, hookpoints=['h.0.mlp', 'h.1.mlp'],
                      init_seeds=[3], log_to_wandb=False)
    started = Trainer(cfg, rows, body).saes
    ours = sparsify_train.initial_coders(32, 128, 8, 'sae', 3, [0, 1])
    for l in (0, 1):
        assert torch.equal(ours[l].decoder.weight, started[f'h.{l}.mlp'].W_dec.T)
        assert torch.equal(ours[l].encoder.weight, started[f'h.{l}.mlp'].encoder.weight)


def test_sparsify_trains_each_kind_and_seed_at_every_layer_on_the_train_tokens(tiny_runs):
    model = load_model(str(tiny_runs / 'dense'))[0]
    settings = dict(n_tokens=2048, batch_size=256, lr=0.0, seed=0)
    specs = [('sae', 0), ('sae', 1), ('transcoder', 0)]
    coders, seconds, tokens = sparsify_train.train_dictionaries(model, [0, 1], specs, tiny_runs / 'data', 8,
                                                                settings, 'test')
    assert set(coders) == {(kd, s, l) for kd, s in specs for l in (0, 1)} and set(seconds) == set(specs)
    assert tokens == 2048  # 8 steps of 8 windows of 32 tokens
    x = torch.randint(0, 50257, (4, 32), generator=torch.Generator().manual_seed(0))
    for kd, s in specs:
        start = sparsify_train.initial_coders(32, 128, 8, kd, s, [0, 1])
        for l in (0, 1):  # each one has moved from where it started, towards the MLP's output
            assert not torch.equal(coders[kd, s, l].decoder.weight, start[l].decoder.weight)
        fvu_trained = dictionary.reconstruction(model, {l: coders[kd, s, l] for l in (0, 1)}, x)
        fvu_start = dictionary.reconstruction(model, start, x)
        assert all(fvu_trained[l] < fvu_start[l] for l in (0, 1)), (kd, s, fvu_trained, fvu_start)


def test_sae_with_trainer_sparsify_end_to_end(copied_runs, run_main):
    dense, topk = copied_runs / 'dense', copied_runs / 'topk'
    run_main('toolkit.sae', f'--out_dir={dense}', f'--compare={topk}', '--trainer=sparsify', '--n_tokens=2048',
             '--batch_size=256', '--eval_tokens=512', '--top_m=4', '--n_clusters=4')
    result = json.loads((dense / 'sae' / 'comparison.json').read_text())
    for kind in ('sae', 'transcoder'):
        assert set(result['routes'][f'dense + {kind}']['layers']) == {'0', '1'}
        assert result['routes'][f'dense + {kind}']['training']['tokens'] == 2048
    assert set(result['stability']['near_initialisation']) == {'0', '1'}
    meta = torch.load(dense / 'sae' / 'sae_layer0_seed1.pt', weights_only=True)['meta']
    assert meta['trainer'] == 'sparsify' and meta['init_seed'] == 1 and 'aux_coef' not in meta
    # the own trainer's dictionaries are other dictionaries: asked for, they are trained, not reused
    printed = run_main('toolkit.sae', f'--out_dir={dense}', f'--compare={topk}', '--trainer=own', '--n_tokens=2048',
                       '--batch_size=256', '--eval_tokens=512', '--top_m=4', '--n_clusters=4', '--stability=False',
                       '--kind=sae', '--layer=1')
    assert 'sae_layer1.pt was trained with other settings' in printed
