"""export.py and interop.py: each format read by its own library (transformers, TransformerLens,
SAELens) gives this project's logits and neurons, on conftest's tiny TopK run and its dense twin."""
import json
import shutil

import pytest
import torch
from torch.nn import functional as F

from conftest import fingerprint, import_or_skip  # the check comes before the optional imports
import_or_skip(("safetensors", "transformers", "transformer_lens", "sae_lens"), "toolkit/requirements-interop.txt")

from sae_lens import SAE  # noqa: E402 (after the check that they are installed)
from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

from toolkit import interop  # noqa: E402
from toolkit.data import get_encoding  # noqa: E402
from toolkit.dictionary import SparseCoder, model_shape, save_dictionary  # noqa: E402
from toolkit.common import load_model  # noqa: E402
from toolkit.neurons import capture  # noqa: E402

TOPK_LAYERS = [0, 1]  # of the tiny runs' 3 blocks, the last one dense


def tokens():
    return torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))


def max_relative_difference(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def export(run_main, tmp_path):
    """export(run, format, *flags): export.py into tmp_path/FORMAT; the folder."""
    def run_export(run, format, *flags):
        dest = tmp_path / format
        run_main('toolkit.export', f'--out_dir={run}', f'--format={format}', f'--dest={dest}', *flags)
        return dest
    return run_export


def ours(run, x):
    """(logits, {layer: neurons}, {layer: (MLP input, MLP output)}) of this project's model."""
    model, _ = load_model(str(run))
    with torch.no_grad(), capture(model, TOPK_LAYERS) as acts, capture(model, TOPK_LAYERS, mlp_io=True) as io:
        logits, _ = model(x, x)
        return logits, dict(acts), dict(io)


def test_a_dense_run_loads_in_transformers_alone_with_this_projects_logits(tiny_runs, export):
    folder = export(tiny_runs / 'dense', 'hf')
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()  # no code of this project
    with torch.no_grad():
        logits = hf(tokens()).logits
    assert logits.shape[-1] == 50304 and max_relative_difference(logits, ours(tiny_runs / 'dense', tokens())[0]) <= 1e-5


def test_the_hf_and_transformer_lens_folders_carry_gpt2s_tokenizer(tiny_runs, export):
    text = "The rain in Spain, 1999.\n<|endoftext|> café"
    tokenizer = AutoTokenizer.from_pretrained(export(tiny_runs / 'dense', 'hf'))  # offline, from the folder
    assert tokenizer.encode(text) == get_encoding().encode(text, allowed_special='all')
    tl = interop.load_transformer_lens(export(tiny_runs / 'dense', 'transformer_lens'))
    assert tl.to_tokens(text, prepend_bos=False)[0].tolist() == get_encoding().encode(text, allowed_special='all')


def test_a_topk_run_through_load_hf_gives_its_logits_and_its_neurons_at_mlp_act(tiny_runs, export):
    folder = export(tiny_runs / 'topk', 'hf')
    assert json.loads((folder / 'config.json').read_text())['topk'] == 8
    logits, acts, _ = ours(tiny_runs / 'topk', tokens())
    hf = interop.load_hf(folder)
    seen = {}
    for layer in TOPK_LAYERS:
        hf.transformer.h[layer].mlp.act.register_forward_hook(lambda m, i, out, l=layer: seen.__setitem__(l, out))
    with torch.no_grad():
        assert max_relative_difference(hf(tokens()).logits, logits) <= 1e-5
        plain = GPT2LMHeadModel.from_pretrained(folder).eval()(tokens()).logits  # dense GELU everywhere
    assert max_relative_difference(plain, logits) > 1e-4  # 10x the tolerance: the TopK activation matters
    for layer in TOPK_LAYERS:
        torch.testing.assert_close(seen[layer], acts[layer], rtol=1e-5, atol=1e-6)


def test_transformer_lens_hook_post_holds_the_same_k_neurons_with_the_same_values(tiny_runs, export):
    tl = interop.load_transformer_lens(export(tiny_runs / 'topk', 'transformer_lens'))
    logits, acts, _ = ours(tiny_runs / 'topk', tokens())
    with torch.no_grad():
        tl_logits, cache = tl.run_with_cache(tokens())
    assert max_relative_difference(tl_logits, logits) <= 1e-5
    for layer in TOPK_LAYERS:
        post = cache[f'blocks.{layer}.mlp.hook_post']
        assert ((post != 0).sum(-1) == 8).all() and torch.equal(post != 0, acts[layer] != 0)
        torch.testing.assert_close(post, acts[layer], rtol=1e-5, atol=1e-6)


def fvu(estimate, target):
    return ((estimate - target).pow(2).sum() / (target - target.mean((0, 1))).pow(2).sum()).item()


def test_saelens_loads_each_topk_mlp_as_a_transcoder_reading_transformer_lens_hooks(tiny_runs, export):
    folder = export(tiny_runs / 'topk', 'saelens')
    assert sorted(p.name for p in folder.iterdir()) == ['layer_0', 'layer_1']
    tl = interop.load_transformer_lens(export(tiny_runs / 'topk', 'transformer_lens'))
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens())
    for layer in TOPK_LAYERS:
        sae = SAE.load_from_disk(folder / f'layer_{layer}')  # registered by importing interop
        hook_in, hook_out = sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out
        assert (hook_in, hook_out) == (f'blocks.{layer}.ln2.hook_normalized', f'blocks.{layer}.hook_mlp_out')
        with torch.no_grad():
            z = sae.encode(cache[hook_in])
            out = sae.decode(z)
        torch.testing.assert_close(z, cache[f'blocks.{layer}.mlp.hook_post'], rtol=1e-5, atol=1e-6)
        assert fvu(out, cache[hook_out]) < 1e-10


def randomised_layernorms(model):
    """LayerNorm weights and biases far from their initial 1 and 0, so that folding them shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_2.weight.copy_(1 + torch.rand(block.ln_2.weight.shape, generator=g))
            if block.ln_2.bias is not None:
                block.ln_2.bias.copy_(torch.randn(block.ln_2.bias.shape, generator=g))
    return model


@pytest.mark.parametrize('bias', [True, False])
def test_the_transcoder_reads_the_installed_transformer_lenss_hook_normalized(tiny_model, bias):
    model = randomised_layernorms(tiny_model(bias=bias))
    model.set_alpha(0.0)
    args, weights = interop.tl_weights(model)
    tl = interop.hooked(HookedTransformerConfig(**args), weights, model.config.topk, model.config.n_nontopk)
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens())
        sae = interop.mlp_transcoder(model, 1, {})
        z = sae.encode(cache['blocks.1.ln2.hook_normalized'])
        torch.testing.assert_close(z, cache['blocks.1.mlp.hook_post'], rtol=1e-5, atol=1e-5)
        assert fvu(sae.decode(z), cache['blocks.1.hook_mlp_out']) < 1e-10


@pytest.mark.parametrize('before_affine', [True, False])  # TransformerLens 3 and 2: each one's hook_normalized
def test_the_encoder_reads_the_mlp_input_from_either_hook_normalized(tiny_model, before_affine):
    block = randomised_layernorms(tiny_model()).transformer.h[1]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    n = F.layer_norm(x, (32,))  # before the weight and bias
    w, b = interop.mlp_input_encoder(block.ln_2, block.mlp.c_fc, before_affine)
    with torch.no_grad():
        hooked_vector = n if before_affine else block.ln_2(x)
        torch.testing.assert_close(hooked_vector @ w + b, block.mlp.c_fc(block.ln_2(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['sae', 'transcoder'])
def test_a_dictionary_of_sae_py_exports_to_saelens_with_its_latents_and_reconstruction(tiny_runs, export, tmp_path,
                                                                                       kind):
    model, _ = load_model(str(tiny_runs / 'dense'))
    torch.manual_seed(0)
    coder = SparseCoder(32, 64, 4, transcoder=kind == 'transcoder')
    with torch.no_grad():
        coder.b_pre.normal_()  # a b_pre of zero would not show where it goes
        coder.encoder.bias.normal_()
    save_dictionary(tmp_path / 'coder.pt', coder, dict(kind=kind, layer=1, d_in=32, n_latents=64, k=4,
                                                        model_args=model_shape(model)))
    sae = SAE.load_from_disk(export(tiny_runs / 'dense', 'saelens', f'--dictionary={tmp_path / "coder.pt"}'))
    normalized = torch.randn(10, 32)  # what a transcoder's hook, blocks.1.ln2.hook_normalized, holds
    ln = model.transformer.h[1].ln_2
    before_affine = kind == 'transcoder' and interop.HOOK_BEFORE_AFFINE  # the installed TransformerLens's hook
    x = normalized * ln.weight + ln.bias if before_affine else normalized  # the coder's own input
    with torch.no_grad():
        reconstruction, z, _ = coder(x)
        torch.testing.assert_close(sae.encode(normalized), z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.decode(sae.encode(normalized)), reconstruction, rtol=1e-5, atol=1e-6)
    assert sae.cfg.metadata.hook_name == ('blocks.1.hook_mlp_out' if kind == 'sae' else 'blocks.1.ln2.hook_normalized')


def test_a_dictionary_exports_only_with_the_checkpoint_it_was_trained_on(tiny_runs, run_main, tmp_path):
    model, _ = load_model(str(tiny_runs / 'dense'))  # ckpt.pt, iteration 8; the series has 0 and 4 too
    save_dictionary(tmp_path / 'coder.pt', SparseCoder(32, 64, 4, transcoder=True),
                    dict(kind='transcoder', layer=1, d_in=32, n_latents=64, k=4, model_args=model_shape(model),
                         source_iter=0))
    flags = [f'--out_dir={tiny_runs / "dense"}', '--format=saelens', f'--dictionary={tmp_path / "coder.pt"}']
    with pytest.raises(SystemExit) as e:
        run_main('toolkit.export', *flags, f'--dest={tmp_path / "final"}')
    assert str(e.value.code) == (f"error: --dictionary={tmp_path / 'coder.pt'} was trained on iteration 0 of the run, "
                                 f"not on {tiny_runs / 'dense'} (iteration 8); give --ckpt= that checkpoint")
    assert not (tmp_path / 'final').exists()
    run_main('toolkit.export', *flags, '--ckpt=ckpt_000000.pt', f'--dest={tmp_path / "first"}')
    assert (tmp_path / 'first').is_dir()


def test_a_model_without_biases_becomes_a_gpt2_with_the_same_logits(tiny_model):
    model = tiny_model(bias=False)
    model.set_alpha(0.0)
    with torch.no_grad():
        assert max_relative_difference(interop.to_hf(model)(tokens()).logits, model(tokens(), tokens())[0]) <= 1e-5


def test_a_model_from_gpt2s_weights_keeps_its_tanh_gelu_and_vocabulary_in_every_format(tiny_model):
    model = tiny_model(gelu='tanh', vocab_size=50257)  # as train.py --init_from=gpt2 builds it
    x = tokens()
    with torch.no_grad(), capture(model, TOPK_LAYERS) as acts:
        logits, _ = model(x, x)
        hf = interop.to_hf(model)
        assert hf.config.activation_function == 'gelu_new' and max_relative_difference(hf(x).logits, logits) <= 1e-5
        cfg, weights = interop.tl_weights(model)
        tl_logits, cache = interop.hooked(HookedTransformerConfig(**cfg), weights, 8, 1).run_with_cache(x)
    assert cfg['act_fn'] == 'gelu_new' and max_relative_difference(tl_logits, logits) <= 1e-5
    for layer in TOPK_LAYERS:
        torch.testing.assert_close(cache[f'blocks.{layer}.mlp.hook_post'], acts[layer], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # SAELens: the transcoder's latents are the neurons, through the same GELU
        latents = interop.mlp_transcoder(model, 0, {}).encode(cache['blocks.0.ln2.hook_normalized'])
    torch.testing.assert_close(latents, acts[0], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_the_series_is_exported_by_name(tiny_runs, export):
    folder = export(tiny_runs / 'topk', 'hf', '--ckpt=ckpt_000004.pt')
    logits, _, _ = ours(tiny_runs / 'topk' / 'ckpt_000004.pt', tokens())
    assert max_relative_difference(logits, ours(tiny_runs / 'topk', tokens())[0]) > 1e-4  # not the final model's
    with torch.no_grad():
        assert max_relative_difference(interop.load_hf(folder)(tokens()).logits, logits) <= 1e-5


def test_overwrite_replaces_a_previous_export(tiny_runs, export):
    export(tiny_runs / 'topk', 'hf')
    folder = export(tiny_runs / 'dense', 'hf', '--overwrite=True')
    assert json.loads((folder / 'config.json').read_text())['topk'] == 0
    assert [p.name for p in folder.parent.iterdir()] == ['hf']  # no temporary folder left


def another_version(tmp_path, run):
    """A checkpoint whose model_args carry a key this version of the model does not know."""
    checkpoint = torch.load(run / 'ckpt.pt', weights_only=True)
    checkpoint['model_args']['rotary'] = True
    torch.save(checkpoint, tmp_path / 'other' / 'ckpt.pt')
    return tmp_path / 'other'


@pytest.mark.parametrize('case, flags, message', [
    ('unknown format', ['--format=onnx'], '--format=onnx is not one of hf, transformer_lens, saelens'),
    ('dest holding files', ['--format=hf', '--dest={d}/full'], '--dest={d}/full already holds files'),
    ('saelens of a dense run', ['--out_dir={dense}', '--format=saelens'], "--format=saelens exports the TopK blocks' MLPs"),
    ('another model version', ['--out_dir={d}/other', '--format=hf'], 'checkpoint {d}/other does not fit the model'),
    ('dest holding the run', ['--out_dir={d}/run', '--format=hf', '--dest={d}', '--overwrite=True'],
     '--dest={d} holds {d}/run, which an export must not replace'),
    ('dest naming the run through a link', ['--out_dir={d}/run', '--format=hf', '--dest={d}/alias/run', '--overwrite=True'],
     '--dest={d}/alias/run holds {d}/run, which an export must not replace'),
])
def test_bad_input_fails_in_one_line_and_leaves_no_partial_folder(tiny_runs, run_main, tmp_path, case, flags, message):
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'kept.txt').write_text('mine')
    (tmp_path / 'other').mkdir()
    another_version(tmp_path, tiny_runs / 'topk')
    (tmp_path / 'run').mkdir()
    shutil.copy(tiny_runs / 'topk' / 'ckpt.pt', tmp_path / 'run')
    (tmp_path / 'alias').symlink_to(tmp_path)
    values = dict(d=tmp_path, dense=tiny_runs / 'dense')
    flags = [f.format(**values) for f in flags]
    if not any(f.startswith('--dest') for f in flags):
        flags.append(f'--dest={tmp_path / "new"}')
    before = fingerprint(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_main('toolkit.export', f'--out_dir={tiny_runs / "topk"}', *flags)
    error = str(e.value.code)
    assert error.startswith('error: ' + message.format(**values)) and '\n' not in error
    assert fingerprint(tmp_path) == before  # no folder made, none changed
