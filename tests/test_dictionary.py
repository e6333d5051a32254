"""dictionary.py: the TopK SAE and transcoder, their trainer and file format, a dictionary inside
a model in place of its mlp (observed, steered, spliced), and the measurements sae.py reports
(splice cost, FVU, matching, distance from the start)."""
import pytest
import torch
from torch.nn import functional as F

from conftest import TINY_DENSE, planted
from toolkit import dictionary, neurons


def test_an_sae_recovers_a_planted_dictionary():
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(32, 64, generator=g), dim=0)
    torch.manual_seed(0)
    coder = dictionary.SparseCoder(32, 64, k=4)
    trainer = dictionary.Trainer(coder, lr=1e-2, dead_tokens=256 * 20)
    for _ in range(500):
        x = planted(256, directions, 4, g)
        trainer.step(x, x)
    best_cosine = (F.normalize(coder.decoder.weight.detach(), dim=0).T @ directions).max(0).values
    assert (best_cosine > 0.9).float().mean() >= 0.9  # most planted directions found
    x = planted(4096, directions, 4, g)
    assert dictionary.normalised_mse(coder(x)[0], x) < 0.15


def test_decoder_columns_stay_unit_norm_and_b_pre_starts_at_the_mean():
    torch.manual_seed(0)
    coder = dictionary.SparseCoder(16, 40, k=3)
    x = torch.randn(128, 16) * 3 + 1
    trainer = dictionary.Trainer(coder, lr=1e-2)
    trainer.step(x, x)
    norms = coder.decoder.weight.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(40), rtol=0, atol=1e-6)
    for _ in range(5):
        trainer.step(x, x)
    torch.testing.assert_close(coder.decoder.weight.norm(dim=0), torch.ones(40), rtol=0, atol=1e-6)
    fresh = dictionary.SparseCoder(16, 40, k=3)
    torch.testing.assert_close(fresh.decoder.weight, F.normalize(fresh.encoder.weight.T, dim=0))  # tied init
    dictionary.Trainer(fresh, lr=0.0).step(x, x)
    torch.testing.assert_close(fresh.b_pre.data, x.mean(0))


def test_the_k_latents_are_the_top_k_pre_activations_after_a_relu():
    coder = dictionary.SparseCoder(8, 20, k=5)
    x = torch.randn(6, 8)
    _, z, pre = coder(x)
    kept = torch.zeros_like(pre).scatter_(-1, pre.topk(5, dim=-1).indices, 1.0).bool()
    torch.testing.assert_close(z, torch.where(kept, pre.relu(), torch.zeros_like(pre)))


def test_aux_k_is_zero_without_dead_latents_and_uses_the_top_d_in_over_2_dead_ones():
    torch.manual_seed(0)
    coder = dictionary.SparseCoder(16, 40, k=3)
    with torch.no_grad():
        coder.encoder.bias[:10] += 5  # the dead latents' pre-activations are positive: none cut by the ReLU
    x = torch.randn(1, 16)
    x_hat, _, pre = coder(x)
    residual = (x - x_hat).detach()
    assert dictionary.aux_k_loss(coder, pre, residual, torch.zeros(40, dtype=torch.bool)).item() == 0
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:10] = True
    aux = dictionary.aux_k_loss(coder, pre, residual, dead)
    assert aux.item() > 0
    aux.backward()  # the gradient reaches k_aux = d_in / 2 = 8 of the 10 dead latents, the largest
    reached = coder.encoder.weight.grad.abs().sum(1) > 0
    assert reached.sum() == 8 and not reached[10:].any()
    assert set(reached.nonzero().flatten().tolist()) == set(pre[0, :10].topk(8).indices.tolist())


def test_the_gradient_along_each_decoder_column_is_removed():
    torch.manual_seed(0)
    coder = dictionary.SparseCoder(16, 40, k=3)
    x = torch.randn(32, 16)
    dictionary.normalised_mse(coder(x)[0], x).backward()
    assert (coder.decoder.weight.grad * coder.decoder.weight).sum(0).abs().max() > 1e-4  # before: not orthogonal
    coder.remove_parallel_grad()
    torch.testing.assert_close((coder.decoder.weight.grad * coder.decoder.weight).sum(0), torch.zeros(40),
                               rtol=0, atol=1e-7)


def test_a_transcoder_learns_a_planted_sparse_map_from_input_to_output():
    g = torch.Generator().manual_seed(0)
    reads, writes = (F.normalize(torch.randn(24, 48, generator=g), dim=0) for _ in range(2))
    torch.manual_seed(0)
    coder = dictionary.SparseCoder(24, 48, k=3, transcoder=True)
    trainer = dictionary.Trainer(coder, lr=1e-2, dead_tokens=256 * 20)
    for _ in range(400):
        codes = planted(256, torch.eye(48), 3, g) - 0.3
        trainer.step(codes @ reads.T, codes @ writes.T)  # input and output share the sparse code
    codes = planted(2048, torch.eye(48), 3, g) - 0.3
    assert dictionary.normalised_mse(coder(codes @ reads.T)[0], codes @ writes.T) < 0.3


def test_a_latent_that_has_not_fired_for_dead_tokens_tokens_counts_as_dead():
    coder = dictionary.SparseCoder(4, 6, k=1)
    trainer = dictionary.Trainer(coder, lr=0.0, dead_tokens=20)
    x = torch.randn(10, 4)
    for _ in range(3):
        _, _, dead = trainer.step(x, x)
    fired = (coder(x)[1] > 0).any(0)
    assert trainer.since_fired[fired].eq(0).all() and trainer.since_fired[~fired].eq(30).all()
    assert dead == pytest.approx((~fired).float().mean().item())  # dead before the third step: 20 tokens


def test_an_attached_dictionary_observes_without_changing_the_model_and_steers_by_its_decoder(tiny_model):
    model, tokens = tiny_model(**TINY_DENSE), torch.randint(0, 512, (2, 16))
    clean, _ = model(tokens)
    torch.manual_seed(1)
    coder = dictionary.SparseCoder(16, 64, k=4)
    with dictionary.attached(model, {1: coder}):
        observed, _ = model(tokens)
        assert torch.equal(observed, clean)
        assert neurons.mlp_acts(model)[1] is coder.act and neurons.decoder_directions(model, 1) is coder.decoder.weight
        outs = []
        hook = model.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: outs.append(o))
        model(tokens)
        with neurons.steering(model, 1, 7, 2.0):
            model(tokens)
        hook.remove()
        with neurons.capture(model, [1]) as captured:
            model(tokens)
    z7 = captured[1][..., 7]
    torch.testing.assert_close(outs[1] - outs[0], (2.0 - z7)[..., None] * coder.decoder.weight[:, 7], rtol=0, atol=1e-5)
    assert not isinstance(model.transformer.h[1].mlp, dictionary.DictionarySite)  # detached on leaving the block


def test_a_dictionary_file_loads_with_weights_only_and_bad_files_fail_in_one_line(tmp_path):
    coder = dictionary.SparseCoder(8, 16, k=2, transcoder=True)
    meta = dict(kind='transcoder', layer=0, d_in=8, n_latents=16, k=2)
    dictionary.save_dictionary(str(tmp_path / 'd.pt'), coder, meta)
    assert torch.load(tmp_path / 'd.pt', weights_only=True)['meta'] == meta
    loaded, _ = dictionary.load_dictionary(str(tmp_path / 'd.pt'))
    assert loaded.transcoder and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                        coder.state_dict().values()))
    torch.save({'weights': torch.ones(2)}, tmp_path / 'bad.pt')
    with pytest.raises(SystemExit, match=r"^error: .*bad.pt is not a dictionary written by sae.py"):
        dictionary.load_dictionary(str(tmp_path / 'bad.pt'))


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
    clean = dictionary.mean_ce(model, tokens)
    with dictionary.attached(model, {0: identity_coder(16), 1: identity_coder(16)}, splice=True):
        assert dictionary.mean_ce(model, tokens) == clean
    with dictionary.zeroed(model, [0, 1]):
        zero = dictionary.mean_ce(model, tokens)
    assert zero != clean
    costs = dictionary.splice_costs(model, {1: identity_coder(16)}, tokens, clean)
    assert costs[1]['loss_recovered'] == 1.0 and costs['all']['ce'] == clean
    assert dictionary.reconstruction(model, {0: identity_coder(16)}, tokens)[0] == pytest.approx(0, abs=1e-10)


def test_matching_a_dictionary_with_itself_shuffled_shares_everything():
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(16, 50, generator=g)
    order = torch.randperm(50, generator=g)
    shared, partner = dictionary.shared_fraction(dec, dec[:, order])
    assert shared == 1.0
    assert (order[torch.as_tensor(partner)] == torch.arange(50)).all()  # each element found its copy
    shared, _ = dictionary.shared_fraction(dec, torch.randn(16, 50, generator=g))
    assert shared < 0.2  # unrelated random directions rarely align


def test_initial_coders_rebuild_where_training_started_and_training_moves_away_from_it():
    a = dictionary.initial_coders(32, 64, 4, 'sae', 0, [0, 1, 2])
    b = dictionary.initial_coders(32, 64, 4, 'sae', 0, [1])  # layer 1 alone starts as it does beside 0 and 2
    torch.testing.assert_close(a[1].decoder.weight, b[1].decoder.weight, rtol=0, atol=0)
    assert dictionary.near_initialisation(a[1], b[1]) == 1.0
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(32, 64, generator=g), dim=0)
    trainer = dictionary.Trainer(a[1], lr=1e-2, dead_tokens=256 * 20)
    for _ in range(300):
        x = planted(256, directions, 4, g)
        trainer.step(x, x)
    assert dictionary.near_initialisation(a[1], b[1]) < 0.3  # it found the planted directions instead
