"""
Export a trained run for the interpretability tools (interop.py says how each reads a TopK LM):

    python export.py --out_dir=out-toy --format=hf --dest=out-toy/hf
    python export.py --out_dir=out-toy --format=transformer_lens --dest=out-toy/tl
    python export.py --out_dir=out-toy --format=saelens --dest=out-toy/saelens      # one folder per TopK layer
    python export.py --out_dir=out-toy-dense --format=saelens --dictionary=out-toy-dense/sae/sae_layer0.pt

and then, with no code of this project for a dense run:
    transformers.GPT2LMHeadModel.from_pretrained('out-toy/hf')
or, for a TopK run (importing interop also registers the TopK transcoder with SAELens):
    interop.load_hf('out-toy/hf'), interop.load_transformer_lens('out-toy/tl'),
    sae_lens.SAE.load_from_disk('out-toy/saelens/layer_0')

The folder is written beside --dest under a temporary name and renamed when complete.
"""
import glob
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

import interop
from common import UMASK
from configurator import configure, die
from dictionary import load_dictionary, model_shape
from model import load_model

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to export
ckpt = ''  # '' = its ckpt.pt; or a checkpoint of its series (ckpt_000400.pt), or a path
format = 'hf'  # 'hf' (transformers), 'transformer_lens', 'saelens'
dest = ''  # the folder to write; '' = OUT_DIR/export_FORMAT
overwrite = False  # replace a --dest that holds files
dictionary = ''  # with --format=saelens: a dictionary file of sae.py to export instead of the MLPs
# -----------------------------------------------------------------------------
FORMATS = ('hf', 'transformer_lens', 'saelens')


def write_hf(model, folder):
    interop.to_hf(model).save_pretrained(folder)  # safetensors; config.json has topk, n_nontopk


def write_transformer_lens(model, folder):
    c = model.config
    args = interop.tl_config(c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size)
    weights = convert_gpt2_weights(interop.to_hf(model), HookedTransformerConfig(**args))
    # safetensors stores each tensor on its own: W_U is a transposed view of W_E until copied
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, os.path.join(folder, 'model.safetensors'))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({**args, 'topk': c.topk, 'n_nontopk': c.n_nontopk}, f, indent=1)


def write_saelens(model, folder, source):
    c = model.config
    if dictionary:
        coder, meta = load_dictionary(dictionary)
        if meta.get('model_args') != model_shape(model):
            die(f"--dictionary={dictionary} was trained on another model ({meta.get('model_args')}), not on {source}")
        interop.dictionary_sae(coder, meta, dict(model_name=source)).save_model(folder)
        return
    if not c.topk or c.n_nontopk == c.n_layer:
        die(f"--format=saelens exports the TopK blocks' MLPs, and {source} has none (topk={c.topk}, "
            f"n_nontopk={c.n_nontopk} of {c.n_layer} blocks); give --dictionary=FILE of sae.py for a dense run")
    for layer in interop.topk_layers(c.n_layer, c.topk, c.n_nontopk):
        interop.mlp_transcoder(model, layer, dict(model_name=source)).save_model(os.path.join(folder, f'layer_{layer}'))


def checkpoint_path():
    if not ckpt:
        return out_dir
    inside = os.path.join(out_dir, ckpt)
    if os.path.isfile(inside):
        return inside
    if os.path.isfile(ckpt):
        return ckpt
    series = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, 'ckpt_*.pt')))
    die(f"--ckpt={ckpt} is neither a file in {out_dir} nor a path; the series there: {', '.join(series) or 'none'}")


def main():
    if format not in FORMATS:
        die(f"--format={format} is not one of {', '.join(FORMATS)}")
    if dictionary and format != 'saelens':
        die(f"--dictionary goes with --format=saelens, not --format={format}")
    target = dest or os.path.join(out_dir, f'export_{format}')
    if os.path.exists(target) and not os.path.isdir(target):
        die(f"--dest={target} is a file, not a folder")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        die(f"--dest={target} already holds files; give another --dest or --overwrite=True")
    source = checkpoint_path()
    model, _ = load_model(source)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp_export_')
    try:
        with torch.no_grad():
            if format == 'hf':
                write_hf(model, tmp)
            elif format == 'transformer_lens':
                write_transformer_lens(model, tmp)
            else:
                write_saelens(model, tmp, source)
        for folder, _, files in os.walk(tmp):  # mkdtemp and safetensors make owner-only modes: use the usual ones
            os.chmod(folder, 0o777 & ~UMASK)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~UMASK)
        if os.path.exists(target):  # empty, or --overwrite: the old folder goes once the new one is whole
            old = tempfile.mkdtemp(dir=parent, prefix='.old_export_')
            os.replace(target, os.path.join(old, 'dest'))
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {target} ({format}) from {source}")


configure(globals())
main()
