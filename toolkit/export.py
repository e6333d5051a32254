"""
Export a trained run for the interpretability tools (interop.py says how each reads a TopK LM):

    python -m toolkit.export --out_dir=out-toy --format=hf --dest=out-toy/hf
    python -m toolkit.export --out_dir=out-toy --format=transformer_lens --dest=out-toy/tl
    python -m toolkit.export --out_dir=out-toy --format=saelens --dest=out-toy/saelens      # one folder per TopK layer
    python -m toolkit.export --out_dir=out-toy-dense --format=saelens --dictionary=out-toy-dense/sae/sae_layer0.pt

and then read them: a dense run's hf folder with transformers alone,
    transformers.GPT2LMHeadModel.from_pretrained('out-toy-dense/hf')
and a TopK run's through interop (whose import also registers the TopK transcoder with SAELens):
    interop.load_hf('out-toy/hf'), interop.load_transformer_lens('out-toy/tl'),
    sae_lens.SAE.load_from_disk('out-toy/saelens/layer_0')

The folder is written beside --dest under a temporary name and renamed when complete; a --dest
that holds the run, its checkpoint or the dictionary is refused, even with --overwrite.
"""
import glob
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from configurator import configure, die
from model import topk_layers
from toolkit import interop
from toolkit.common import load_model
from toolkit.data import UMASK
from toolkit.dictionary import load_dictionary, model_shape

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
    interop.write_tokenizer(folder)


def write_transformer_lens(model, folder):
    args, weights = interop.tl_weights(model)
    # safetensors stores each tensor on its own: W_U is a transposed view of W_E until copied
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, os.path.join(folder, 'model.safetensors'))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({**args, 'topk': model.config.topk, 'n_nontopk': model.config.n_nontopk}, f, indent=1)
    interop.write_tokenizer(folder)


def write_saelens(model, folder, source, coded):
    if coded:
        interop.dictionary_sae(*coded, model, dict(model_name=source)).save_model(folder)
        return
    c = model.config
    for layer in topk_layers(c.n_layer, c.topk, c.n_nontopk):
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


def checked_target(source, model, iter_num, coded):
    """--dest, once every check that can refuse the export has passed (before anything is written)."""
    if format not in FORMATS:
        die(f"--format={format} is not one of {', '.join(FORMATS)}")
    if dictionary and format != 'saelens':
        die(f"--dictionary goes with --format=saelens, not --format={format}")
    c = model.config
    if format == 'saelens' and not dictionary and not topk_layers(c.n_layer, c.topk, c.n_nontopk):
        die(f"--format=saelens exports the TopK blocks' MLPs, and {source} has none (topk={c.topk}, "
            f"n_nontopk={c.n_nontopk} of {c.n_layer} blocks); give --dictionary=FILE of sae.py for a dense run")
    if coded:
        meta = coded[1]
        if meta.get('model_args') != model_shape(model):
            die(f"--dictionary={dictionary} was trained on another model ({meta.get('model_args')}), not on {source}")
        # the run's checkpoints share a shape: a dictionary fits the weights it was trained on alone
        if meta.get('source_iter', iter_num) != iter_num:
            die(f"--dictionary={dictionary} was trained on iteration {meta['source_iter']} of the run, not on "
                f"{source} (iteration {iter_num}); give --ckpt= that checkpoint")
    target = os.path.abspath(dest or os.path.join(out_dir, f'export_{format}'))
    if os.path.exists(target) and not os.path.isdir(target):
        die(f"--dest={target} is a file, not a folder")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        die(f"--dest={target} already holds files; give another --dest or --overwrite=True")
    for kept in filter(None, (out_dir, source, dictionary)):  # --overwrite must never remove what it reads
        real = os.path.realpath(target)  # links resolved: one folder may go by two names
        if os.path.commonpath([real, os.path.realpath(kept)]) == real:
            die(f"--dest={target} holds {kept}, which an export must not replace; give another --dest")
    return target


def main():
    source = checkpoint_path()
    model, ckpt = load_model(source)
    coded = load_dictionary(dictionary) if dictionary else None  # (coder, meta)
    target = checked_target(source, model, ckpt['iter_num'], coded)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp_export_')
    except OSError as e:
        die(f"cannot write beside --dest={target}: {e}")
    try:
        with torch.no_grad():
            if format == 'hf':
                write_hf(model, tmp)
            elif format == 'transformer_lens':
                write_transformer_lens(model, tmp)
            else:
                write_saelens(model, tmp, source, coded)
        for folder, _, files in os.walk(tmp):  # mkdtemp and safetensors make owner-only modes: use the usual ones
            os.chmod(folder, 0o777 & ~UMASK)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~UMASK)
        replace(tmp, target)
    except OSError as e:
        die(f"cannot write --dest={target}: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {target} ({format}) from {source}")


def replace(new, target):
    """Put folder new at target. An old folder there (empty, or --overwrite) is moved aside first
    and removed only once the new one is in place; if that fails, it is moved back."""
    if not os.path.exists(target):
        os.replace(new, target)
        return
    aside = tempfile.mkdtemp(dir=os.path.dirname(target), prefix='.old_export_')
    try:
        os.replace(target, os.path.join(aside, 'old'))
        try:
            os.replace(new, target)
        except OSError:
            os.replace(os.path.join(aside, 'old'), target)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


configure(globals())
main()
