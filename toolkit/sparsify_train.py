"""
The post-hoc dictionaries trained by EleutherAI sparsify (optional: pip install -r
toolkit/requirements-interop.txt), for sae.py --trainer=sparsify: the same budget and the same train
tokens as dictionary.py's own trainer, with sparsify's recipe and defaults.

sparsify trains on a transformers model, so the dense twin goes in as the GPT2LMHeadModel that
interop.to_hf builds from its weights, and each dictionary reads the hookpoint h.L.mlp: its output
(an SAE) or its input, ln_2's output, to its output (a transcoder, transcode=True). Its defaults
differ from dictionary.py's in the optimizer (signum: sign descent with schedule-free averaging,
lr = 5e-3 / sqrt(n_latents / 2^14)), the transcoder's decoder (starts at zero) and dead latents
(no AuxK). Its SparseCoder is dictionary.py's with other names (ReLU before TopK keeps the same
values as after it), so a trained one converts exactly:

    z = TopK_k(ReLU(encoder(x - b_dec)))      (a transcoder encodes x)     encoder -> encoder
    x_hat = z @ W_dec + b_dec                                                W_dec   -> decoder.weight^T
                                                                             b_dec   -> b_pre
"""
import os
import tempfile
import time

import torch
from datasets import Dataset
from sparsify import SparseCoder as SparsifyCoder
from sparsify import SparseCoderConfig, TrainConfig, Trainer

from toolkit.dictionary import SparseCoder, train_windows
from toolkit.interop import to_hf


def converted(coder, transcoder):
    """dictionary.py's SparseCoder holding a sparsify SparseCoder's weights."""
    ours = SparseCoder(coder.d_in, coder.num_latents, coder.cfg.k, transcoder)
    with torch.no_grad():
        ours.encoder.weight.copy_(coder.encoder.weight)
        ours.encoder.bias.copy_(coder.encoder.bias)
        ours.decoder.weight.copy_(coder.W_dec.T)
        ours.b_pre.copy_(coder.b_dec)
    return ours


def sparsify_config(n_latents, k, kind):
    return SparseCoderConfig(num_latents=n_latents, k=k, transcode=kind == 'transcoder')


def initial_coders(d_in, n_latents, k, kind, seed, layers, dev='cpu'):
    """{layer: coder} as sparsify's Trainer starts them: seeded afresh for every hookpoint, so
    every layer starts from the same coder, and drawn on dev, as it draws them (a CUDA generator's
    numbers are not the CPU's)."""
    out = {}
    for l in layers:
        torch.manual_seed(seed)
        coder = SparsifyCoder(d_in, sparsify_config(n_latents, k, kind), dev, dtype=torch.float32)
        out[l] = converted(coder, kind == 'transcoder').to(dev)
    return out


def train_dictionaries(model, layers, specs, data_dir, k, settings, desc):
    """dictionary.train_dictionaries with sparsify's Trainer: a coder per (kind, init seed) in specs
    and per layer, one sparsify run per (kind, seed) over the same train windows. Returns
    ({(kind, seed, layer): coder}, {(kind, seed): seconds of its run}, tokens per coder)."""
    dev = next(model.parameters()).device
    # GPT2Model, without the LM head: sparsify runs the whole forward for activations, and the
    # 50k-vocabulary logits would be most of each step's time
    body = to_hf(model).transformer.to(dev).requires_grad_(False)
    n_latents, T = model.transformer.h[layers[0]].mlp.c_fc.out_features, model.config.block_size  # d_ff
    windows = torch.cat(list(train_windows(data_dir, T, settings['n_tokens'], settings['batch_size'], settings['seed'])))
    data = Dataset.from_dict({'input_ids': windows.numpy()}).with_format('torch')
    coders, seconds = {}, {}
    for kd, s in specs:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(sparsify_config(n_latents, k, kd),
                              batch_size=max(1, settings['batch_size'] // T), hookpoints=[f'h.{l}.mlp' for l in layers],
                              init_seeds=[s], lr=settings['lr'] or None, log_to_wandb=False, save_dir=tmp,
                              run_name='run')
            print(f"{desc}: sparsify, {kd} seed {s}")
            t0 = time.time()
            Trainer(cfg, data, body).fit()
            seconds[kd, s] = time.time() - t0
            # the saved coders, not the trainer's: signum's schedule-free averaging holds the
            # averaged weights only while switched to evaluation, which sparsify does to save them
            for l in layers:
                coder = SparsifyCoder.load_from_disk(os.path.join(tmp, 'run', f'h.{l}.mlp'), device=dev)
                coders[kd, s, l] = converted(coder, kd == 'transcoder').to(dev).eval()
    return coders, seconds, windows.numel()
