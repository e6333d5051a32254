"""
What train.py starts a run from (--init_from): start_from checks it against out_dir and the run's
flags, and loads the checkpoint to resume or the trained weights to TopK-ify a dense model from:

  gpt2, gpt2-medium, gpt2-large, gpt2-xl   OpenAI's GPT-2, downloaded once from the Hugging Face hub
  a folder                                 a transformers GPT-2 (config.json, and model.safetensors or
                                           pytorch_model.bin, as save_pretrained writes them)
  a ckpt.pt (or a run's out_dir)           a run of this project, usually a dense one (--topk=0)

The files are read as they are, without transformers, so the core install stays as it is:
safetensors is a JSON header and the raw arrays. GPT-2's Conv1D layers keep their weights as
(in, out), nn.Linear as (out, in); its vocabulary is the unpadded 50,257 tokens (a padded row
would get logit 0, far above GPT-2's, and change the loss); its GELU is the tanh approximation.
"""
import json
import os
import pickle
import struct

import torch
from huggingface_hub import hf_hub_download  # installed with datasets (requirements.txt)

from configurator import die
from toolkit.common import load_checkpoint

HUB = {name: f'openai-community/{name}' for name in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')}
# nn.Linear keeps (out, in), GPT-2's Conv1D (in, out): these four weights are transposed
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
GELU_OF = {'gelu': 'none', 'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh'}  # transformers' name -> GPTConfig.gelu
HF_GELU = {'none': 'gelu', 'tanh': 'gelu_new'}  # and back, the name toolkit/interop.py writes (TransformerLens's too)
SHAPE = ('n_layer', 'n_head', 'n_embd', 'bias')  # what the weights fix; block_size may be shorter
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file: an 8-byte little-endian header length, the JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets after the header), then the bytes."""
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(n))
        data = bytearray(os.fstat(f.fileno()).st_size - 8 - n)  # writable, as torch.frombuffer wants;
        if f.readinto(data) != len(data):                         # one copy in memory, the tensors share it
            raise ValueError(f"{path} is shorter than its header says")
    tensors = {}
    for name, t in header.items():
        if name == '__metadata__':
            continue
        if t['dtype'] not in SAFETENSORS_DTYPES:
            die(f"{path}: tensor {name} has dtype {t['dtype']}, not one of {', '.join(SAFETENSORS_DTYPES)}")
        dtype, (begin, end) = SAFETENSORS_DTYPES[t['dtype']], t['data_offsets']
        count = (end - begin) // dtype.itemsize
        tensors[name] = torch.frombuffer(data, dtype=dtype, offset=begin, count=count).view(t['shape'])
    return tensors


def hub_folder(name):
    """The local copy of OpenAI's GPT-2 `name` (huggingface_hub downloads it once, then caches it)."""
    try:
        for file in ('config.json', 'model.safetensors'):
            path = hf_hub_download(HUB[name], file)
    except Exception as e:  # offline, or the hub refused: say so in one line
        die(f"--init_from={name}: cannot fetch {HUB[name]} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return os.path.dirname(path)


def folder_weights(folder):
    """(shape, state dict under this project's names) of a transformers GPT-2 folder."""
    with open(os.path.join(folder, 'config.json')) as f:
        cfg = json.load(f)
    where = f"--init_from={folder}"
    if cfg.get('model_type') != 'gpt2':
        die(f"{where}: config.json is a {cfg.get('model_type')!r} model, not GPT-2")
    act = cfg.get('activation_function', 'gelu_new')
    if act not in GELU_OF:
        die(f"{where}: activation_function {act!r} is none of {', '.join(GELU_OF)}")
    if cfg.get('n_inner') not in (None, 4 * cfg['n_embd']) or cfg.get('layer_norm_epsilon', 1e-5) != 1e-5:
        die(f"{where}: this project's GPT-2 has d_ff = 4 * n_embd and LayerNorm eps 1e-5; config.json has "
            f"n_inner {cfg.get('n_inner')} and layer_norm_epsilon {cfg.get('layer_norm_epsilon')}")
    if os.path.exists(os.path.join(folder, 'model.safetensors')):
        raw = read_safetensors(os.path.join(folder, 'model.safetensors'))
    elif os.path.exists(os.path.join(folder, 'pytorch_model.bin')):
        raw = torch.load(os.path.join(folder, 'pytorch_model.bin'), map_location='cpu', weights_only=True)
    else:
        die(f"{where}: no model.safetensors or pytorch_model.bin")
    # GPT2LMHeadModel saves 'transformer.h.0...', OpenAI's files on the hub (GPT2Model) 'h.0...'
    raw = {k.removeprefix('transformer.'): v for k, v in raw.items()}
    wte = raw['wte.weight']
    if 'lm_head.weight' in raw and not torch.equal(raw['lm_head.weight'], wte):
        die(f"{where}: its lm_head is not tied to wte, as this project's GPT-2 is")
    state = {'lm_head.weight': wte}
    for k, v in raw.items():
        if k == 'lm_head.weight' or k.endswith(('.attn.bias', '.attn.masked_bias')):  # tied; causal-mask buffers
            continue
        state['transformer.' + k] = v.t() if k.endswith(CONV1D) else v
    shape = dict(n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'], bias=True,
                 block_size=cfg['n_positions'], vocab_size=wte.size(0), gelu=GELU_OF[act])
    return shape, state


def load_weights(source):
    """(shape, state dict) of the weights --init_from names: the model shape they fix (SHAPE,
    block_size, vocab_size, gelu) and the weights under this project's names."""
    if source in HUB or os.path.isfile(os.path.join(source, 'config.json')):
        folder = hub_folder(source) if source in HUB else source
        try:
            return folder_weights(folder)
        except (OSError, ValueError, KeyError, RuntimeError, struct.error, pickle.UnpicklingError) as e:  # damaged
            die(f"--init_from={source}: cannot read the GPT-2 in {folder} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    if os.path.isfile(source) or os.path.isfile(os.path.join(source, 'ckpt.pt')):
        ckpt = load_checkpoint(source)
        a = ckpt['model_args']
        shape = {k: a[k] for k in SHAPE + ('block_size', 'vocab_size')}
        return dict(shape, gelu=a.get('gelu', 'none')), ckpt['model']
    die(f"--init_from={source!r} is not 'scratch', 'resume', 'auto', one of {', '.join(HUB)}, "
        f"a transformers GPT-2 folder or a ckpt.pt")


def start_from(init_from, out_dir, overwrite, model_args, config, given):
    """What train.py's run starts from: (init_from, 'auto' decided; the checkpoint to resume or None;
    the trained weights of a new run or None; model_args with the shape, vocab_size and gelu of the
    weights or checkpoint). The shape comes from them, as the weights fix it; a flag in `given`
    (the keys the user set) that names another shape is refused. 'auto' resumes when out_dir holds
    a ckpt.pt: a job that torchrun --max_restarts restarts picks up where it was. A new run refuses
    to replace the run in out_dir unless overwrite."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if init_from == 'auto':
        init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'
    if init_from != 'resume' and os.path.exists(ckpt_path) and not overwrite:
        die(f"{out_dir} already holds a run (ckpt.pt); continue it with --init_from=resume, "
            f"train into another --out_dir, or replace it with --overwrite=True")
    if init_from == 'resume':
        checkpoint, model_args = resumed_checkpoint(ckpt_path, model_args, config, given)
        return init_from, checkpoint, None, model_args
    if init_from == 'scratch':
        return init_from, None, None, model_args
    # trained weights: a new run from them, fresh optimizer and schedule
    source = os.path.realpath(init_from if os.path.isfile(init_from) else os.path.join(init_from, 'ckpt.pt'))
    in_out_dir = os.path.dirname(source) == os.path.realpath(out_dir)
    if overwrite and in_out_dir and os.path.basename(source).startswith('ckpt'):
        die(f"--init_from={init_from} is a checkpoint of --out_dir={out_dir}, whose ckpt*.pt files --overwrite=True "
            "removes: copy it elsewhere first")
    shape, weights = load_weights(init_from)
    for k in SHAPE:
        if k in given and model_args[k] != shape[k]:
            die(f"--{k}={model_args[k]} differs from {k}={shape[k]} of the weights in {init_from} "
                f"(their shape: {' '.join(f'--{s}={shape[s]}' for s in SHAPE)})")
    model_args = dict(model_args, **{k: shape[k] for k in SHAPE})
    block_size = model_args['block_size'] if 'block_size' in given else shape['block_size']
    if block_size > shape['block_size']:
        die(f"--block_size={block_size} exceeds the {shape['block_size']} positions of the weights in {init_from}")
    # a shorter context: the first positions (weights without them: load_state_dict says so)
    if 'transformer.wpe.weight' in weights:
        weights['transformer.wpe.weight'] = weights['transformer.wpe.weight'][:block_size]
    return init_from, None, weights, dict(model_args, block_size=block_size, vocab_size=shape['vocab_size'],
                                          gelu=shape['gelu'])


def resumed_checkpoint(ckpt_path, model_args, config, given):
    """(checkpoint, model_args as the checkpoint's) of the run in ckpt_path, which the resumed run
    continues: its model shape, unless a flag in `given` names another (refused), and the same
    annealing settings."""
    if not os.path.exists(ckpt_path):
        die(f"--init_from=resume but there is no checkpoint at {ckpt_path}")
    checkpoint = load_checkpoint(ckpt_path, 'cpu')
    missing = {'optimizer', 'iter_num', 'best_val_loss'} - checkpoint.keys()
    if missing:  # e.g. a ckpt_{iter}.pt snapshot copied over ckpt.pt: it holds the model alone
        die(f"{ckpt_path} cannot be resumed from: it has no {', '.join(sorted(missing))}")
    # the model's shape, and alpha's path: another would make alpha jump, and trained_alpha misread the run
    was_args, was_config = checkpoint['model_args'], checkpoint['config']
    shape = {k: was_args.get(k) for k in SHAPE + ('block_size', 'topk', 'n_nontopk')}
    saved = dict(shape, annealing_schedule=was_config.get('annealing_schedule', 'linear'),
                 annealing_ratio=was_config.get('annealing_ratio'))
    for k, was in saved.items():
        if was != config[k] and (k in given or k not in shape):
            die(f"--{k}={config[k]!r} differs from the checkpoint's {k}={was!r} in {ckpt_path}")
    # as the run began: a run from GPT-2's weights has its 50,257 tokens and tanh GELU
    return checkpoint, dict(model_args, **shape, vocab_size=was_args['vocab_size'], gelu=was_args.get('gelu', 'none'))
