"""
Sparse dictionaries for the post-hoc route (sae.py): a TopK sparse autoencoder (SAE) or a
transcoder, its trainer, its file format, and the module that puts it inside a model.

kind 'sae' reconstructs the MLP output of block l from itself; 'transcoder' predicts it from the
MLP input (ln_2's output), a post-hoc sparse MLP. The recipe (Gao et al. 2024; EleutherAI sparsify):

    z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc))     (a transcoder encodes x itself)
    x_hat = W_dec z + b_pre                          W_dec: unit-norm columns
    loss = |x - x_hat|^2 / var(x) + 1/32 * AuxK      Adam, lr = 2e-4 / sqrt(n_latents / 2^14)

b_pre starts at the mean of the first batch's targets, W_dec at W_enc^T with unit columns, and after
every step the columns are renormalised (their gradient's component along them is removed first,
so the step does not just fight the renormalisation). AuxK: the top k_aux = d_in / 2 pre-activations
of the dead latents (no firing in the last dead_tokens tokens) reconstruct what the live ones
missed, which gives dead latents a gradient back to life.

A dictionary plugs into a model as a block's `mlp` (DictionarySite) with the interface of an
MLP: `act` (its latents, hooked like neurons) and `c_proj` (its decoder), so neurons.py, analysis.py
and steer.py read and steer latents with the code they use for neurons. The measurements sae.py
reports are at the end: splice cost, FVU, and matching two dictionaries.
"""
import contextlib
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F
from tqdm import tqdm  # installed with datasets

from configurator import die
from toolkit.data import atomic_write, read_shard, shard_paths
from toolkit.neurons import capture

class TopKReLU(nn.Module):
    """The k largest pre-activations, through a ReLU; the rest zero. Its output is the latent
    vector, read and steered with hooks like a TopK LM's neurons."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, pre):
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


class SparseCoder(nn.Module):
    """A TopK SAE (transcoder=False) or transcoder, as in the module docstring."""

    def __init__(self, d_in, n_latents, k, transcoder=False):
        super().__init__()
        self.transcoder = transcoder
        self.encoder = nn.Linear(d_in, n_latents)  # W_enc, b_enc
        self.act = TopKReLU(k)
        self.decoder = nn.Linear(n_latents, d_in, bias=False)  # W_dec
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        with torch.no_grad():
            self.encoder.bias.zero_()
            self.decoder.weight.copy_(self.encoder.weight.T)
            self.normalise_decoder()

    def pre_activation(self, x):
        return self.encoder(x if self.transcoder else x - self.b_pre)

    def decode(self, z):
        return self.decoder(z) + self.b_pre

    def forward(self, x):
        """(reconstruction, latents, pre-activations)."""
        pre = self.pre_activation(x)
        z = self.act(pre)
        return self.decode(z), z, pre

    @torch.no_grad()
    def normalise_decoder(self):
        w = self.decoder.weight
        w /= w.norm(dim=0, keepdim=True).clamp(min=1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self):
        w, g = self.decoder.weight, self.decoder.weight.grad
        g -= (g * w).sum(0, keepdim=True) * w


def normalised_mse(estimate, target):
    """sum |target - estimate|^2 / sum |target - mean(target)|^2 over the rows: the FVU."""
    return (estimate - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp(min=1e-12)


def aux_k_loss(coder, pre, residual, dead):
    """AuxK: reconstruct the residual target - x_hat from the top k_aux pre-activations of the dead
    latents alone; 0 when none is dead."""
    if not dead.any():
        return pre.new_zeros(())
    k_aux = min(coder.decoder.weight.size(0) // 2, int(dead.sum()))  # d_in / 2
    values, indices = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    return normalised_mse(coder.decoder(z), residual)


class Trainer:
    """Adam on one coder, with the decoder kept unit-norm and firing tracked for AuxK."""

    def __init__(self, coder, lr, aux_coef=1 / 32, dead_tokens=100_000):
        self.coder, self.aux_coef, self.dead_tokens = coder, aux_coef, dead_tokens
        self.optimizer = torch.optim.Adam(coder.parameters(), lr=lr)
        self.since_fired = torch.zeros(coder.encoder.out_features)  # tokens since each latent last fired
        self.started = False

    def step(self, x, target):
        """One step on inputs x and targets (rows): returns (FVU, AuxK, dead fraction)."""
        coder = self.coder
        if not self.started:  # b_pre starts at the data's mean
            with torch.no_grad():
                coder.b_pre.copy_(target.mean(0))
            self.started = True
        dead = self.since_fired >= self.dead_tokens
        x_hat, z, pre = coder(x)
        fvu = normalised_mse(x_hat, target)
        aux = aux_k_loss(coder, pre, (target - x_hat).detach(), dead.to(pre.device))
        (fvu + self.aux_coef * aux).backward()
        coder.remove_parallel_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        coder.normalise_decoder()
        self.since_fired += len(x)
        self.since_fired[(z > 0).any(0).cpu()] = 0
        return fvu.item(), aux.item(), dead.float().mean().item()


# -----------------------------------------------------------------------------
# a dictionary inside the dense twin


class DictionarySite(nn.Module):
    """Takes the place of block.mlp. observe: the MLP's output as it was, plus W_dec (z' - z) where a
    hook has changed the latents z to z' (steering sets latent j to v, which adds (v - z_j) times its
    decoder column); splice: the dictionary's reconstruction instead of the MLP's output."""

    def __init__(self, mlp, coder, splice=False):
        super().__init__()
        self.mlp, self.coder, self.splice = mlp, coder, splice
        self.act, self.c_proj = coder.act, coder.decoder  # an MLP's interface: latents and decoder
        # a transcoder reads the MLP's input as c_fc does (trace.py follows it linearly); an SAE reads its output
        self.c_fc = coder.encoder if coder.transcoder else None
        self.label = f"{'transcoder' if coder.transcoder else 'SAE'} (k = {coder.act.k})"

    def forward(self, h):
        y = self.mlp(h)
        pre = self.coder.pre_activation(h if self.coder.transcoder else y)
        z = self.act(pre)  # through the module, so hooks read and steer the latents
        if self.splice:
            return self.coder.decode(z)
        return y + self.coder.decoder(z - self.act.forward(pre))  # forward() itself runs no hooks


@contextlib.contextmanager
def attached(model, coders, splice=False):
    """Inside the block, each {layer: coder} sits in its block (DictionarySite)."""
    blocks = model.transformer.h
    mlps = {l: blocks[l].mlp for l in coders}
    for l, coder in coders.items():
        blocks[l].mlp = DictionarySite(mlps[l], coder, splice)
    try:
        yield model
    finally:
        for l, mlp in mlps.items():
            blocks[l].mlp = mlp


def save_dictionary(path, coder, meta):
    state = {'model': coder.state_dict(), 'meta': meta}
    atomic_write(path, lambda f: torch.save(state, f))


def model_shape(model):
    """What a dictionary must match in the model it reads: the shape, and dense or TopK."""
    return {k: getattr(model.config, k) for k in ('n_layer', 'n_embd', 'block_size', 'vocab_size', 'topk', 'n_nontopk')}


def load_dictionary(path, device='cpu'):
    """(coder, meta) from a file save_dictionary wrote; a one-line error for anything else."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        meta = state['meta']
        coder = SparseCoder(meta['d_in'], meta['n_latents'], meta['k'], meta['kind'] == 'transcoder')
        coder.load_state_dict(state['model'])
    except FileNotFoundError:
        die(f"no dictionary at {path} (train one with sae.py)")
    except Exception as e:
        die(f"{path} is not a dictionary written by sae.py ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "train it again with sae.py --retrain=True")
    return coder.to(device).eval(), meta


def attach_file(model, path):
    """Attach the dictionary in file `path` to model in observe mode, for good; returns its layer."""
    coder, meta = load_dictionary(path, next(model.parameters()).device)
    if meta.get('model_args') != model_shape(model):
        die(f"{path} was trained on another model ({meta.get('model_args')}), not on this one ({model_shape(model)})")
    block = model.transformer.h[meta['layer']]
    block.mlp = DictionarySite(block.mlp, coder)
    return meta['layer']


def attach_transcoders(model, folder):
    """Each transcoder_layerL.pt of sae.py's folder in its block, in observe mode (the model's
    output is unchanged; a latent's change adds its decoder column): what trace.py follows."""
    names = sorted(f for f in os.listdir(folder) if re.fullmatch(r"transcoder_layer\d+\.pt", f)) \
        if os.path.isdir(folder) else []
    if not names:
        die(f"{folder} holds no transcoder_layerL.pt (sae.py --kind=transcoder writes them to "
            "OUT_DIR/sae/)")
    for name in names:
        layer = attach_file(model, os.path.join(folder, name))
        if not model.transformer.h[layer].mlp.coder.transcoder:
            die(f"{os.path.join(folder, name)} is an SAE, not a transcoder: an SAE reads the MLP's output, which "
                "is not linear in the residual stream, so its latents cannot be traced")


# -----------------------------------------------------------------------------
# training on activations


def train_windows(data_dir, block_size, n_tokens, batch_tokens, seed):
    """Batches (n_seq, block_size) of random windows of the train shards, about n_tokens in all:
    the tokens every dictionary trains on, whichever trainer reads them."""
    shards = [read_shard(p) for p in shard_paths(data_dir, 'train')]
    T = block_size
    room = np.array([max(len(s) - T, 0) for s in shards])
    if not room.sum():
        die(f"the train shards in {data_dir} are no longer than block_size {T}")
    rng, n_seq = np.random.default_rng(seed), max(1, batch_tokens // T)
    for _ in range(max(1, n_tokens // (n_seq * T))):
        which = rng.choice(len(shards), size=n_seq, p=room / room.sum())
        yield torch.stack([torch.from_numpy(shards[s][o:o + T].astype(np.int64))
                           for s, o in zip(which, (rng.integers(0, room[s]) for s in which))])


def activation_batches(model, layers, data_dir, n_tokens, batch_tokens, seed):
    """{layer: (MLP input, MLP output)} rows for batches of train_windows."""
    dev = next(model.parameters()).device
    for x in train_windows(data_dir, model.config.block_size, n_tokens, batch_tokens, seed):
        with torch.no_grad(), capture(model, layers, mlp_io=True) as io:
            model(x.to(dev))
        yield {l: (h.flatten(0, 1), y.flatten(0, 1)) for l, (h, y) in io.items()}


def initial_coders(d_in, n_latents, k, kind, seed, layers, dev='cpu'):
    """{layer: coder} as training starts them. Seeded once per (kind, seed) and built for every layer
    up to the last in order, so layer l starts the same whichever other layers train with it."""
    torch.manual_seed(seed)
    built = [SparseCoder(d_in, n_latents, k, kind == 'transcoder') for _ in range(max(layers) + 1)]
    return {l: built[l].to(dev) for l in layers}


def train_dictionaries(model, layers, specs, data_dir, k, settings, desc):
    """Train a coder per (kind, init seed) in specs and per layer, all in one pass over the data.
    Returns ({(kind, seed, layer): coder}, {(kind, seed): seconds}, tokens seen): the seconds of
    the pass's model forwards plus those of that spec's own steps, what training it alone takes."""
    d_in, n_latents = model.config.n_embd, model.transformer.h[layers[0]].mlp.c_fc.out_features  # d_ff
    dev = next(model.parameters()).device
    rate = settings['lr'] or 2e-4 / math.sqrt(n_latents / 2 ** 14)
    trainers = {}
    for kd, s in specs:
        for l, coder in initial_coders(d_in, n_latents, k, kd, s, layers, dev).items():
            trainers[kd, s, l] = Trainer(coder, rate, settings['aux_coef'], settings['dead_tokens'])
    seconds, tokens = dict.fromkeys(specs, 0.0), 0
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)  # time what the GPU did
    batches = activation_batches(model, layers, data_dir, settings['n_tokens'], settings['batch_size'], settings['seed'])
    bar = tqdm(total=max(1, settings['n_tokens'] // settings['batch_size']), desc=desc, unit='step')
    t0 = time.time()
    for io in batches:
        sync()
        forward, fvus, dead = time.time() - t0, [], []
        tokens += len(next(iter(io.values()))[0])
        for (kd, s, l), trainer in trainers.items():
            t1 = time.time()
            h, y = io[l]
            fvu, _, d = trainer.step(h if kd == 'transcoder' else y, y)
            fvus.append(fvu)
            dead.append(d)
            sync()
            seconds[kd, s] += time.time() - t1
        for spec in specs:
            seconds[spec] += forward
        bar.update()
        bar.set_postfix(fvu=f"{np.mean(fvus):.3f}", dead=f"{np.mean(dead):.3f}")
        t0 = time.time()
    bar.close()
    return {key: t.coder.eval() for key, t in trainers.items()}, seconds, tokens


# -----------------------------------------------------------------------------
# measurements: cost, reconstruction, and whether two dictionaries are the same one


@contextlib.contextmanager
def zeroed(model, layers):
    """Inside the block, the MLPs of the layers add nothing to the residual stream."""
    hooks = [model.transformer.h[l].mlp.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
             for l in layers]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def near_initialisation(coder, initial, threshold=0.7):
    """Fraction of latents whose decoder direction still has cosine > threshold with the one it
    started from: how far training moved the dictionary (random directions in d_in dimensions
    have cosine ~ 1/sqrt(d_in))."""
    cos = F.cosine_similarity(coder.decoder.weight.detach().float().cpu(), initial.decoder.weight.detach().float().cpu(), dim=0)
    return float((cos > threshold).float().mean())


@torch.no_grad()
def token_losses(model, tokens, batch_size=16):
    """Next-token cross-entropy (nats) at every position of the token rows, flattened."""
    out, dev = [], next(model.parameters()).device
    for b in range(0, len(tokens), batch_size):
        rows = tokens[b:b + batch_size].to(dev)
        logits = model.logits(rows[:, :-1])
        out.append(F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction='none'))
    return torch.cat(out)


def mean_ce(model, tokens, batch_size=16):
    """Mean next-token cross-entropy (nats) over every position of the token rows."""
    return token_losses(model, tokens, batch_size).mean().item()


@torch.no_grad()
def reconstruction(model, coders, tokens, batch_size=16):
    """{layer: FVU} of each coder on the tokens: sum |y - y_hat|^2 / sum |y - mean(y)|^2, y the
    MLP output; the denominator from running sums, sum |y|^2 - N |mean(y)|^2."""
    dev, sums = next(model.parameters()).device, {}
    for b in range(0, len(tokens), batch_size):
        with capture(model, list(coders), mlp_io=True) as io:
            model(tokens[b:b + batch_size].to(dev))
        for l, coder in coders.items():
            h, y = (t.flatten(0, 1).float() for t in io[l])
            err = (coder(h if coder.transcoder else y)[0] - y).pow(2).sum().item()
            s = sums.setdefault(l, dict(err=0.0, sq=0.0, sum=0.0, n=0))
            s['err'], s['sq'], s['sum'], s['n'] = (s['err'] + err, s['sq'] + y.pow(2).sum().item(),
                                                   s['sum'] + y.sum(0).double(), s['n'] + len(y))
    return {l: s['err'] / (s['sq'] - (s['sum'] / s['n']).pow(2).sum().item() * s['n']) for l, s in sums.items()}


def shared_fraction(dec_a, dec_b, threshold=0.7):
    """Match two dictionaries' elements one to one (the Hungarian assignment on the cosine of their
    decoder directions, the columns of dec_a and dec_b): (fraction of pairs with cosine above
    threshold, partner[i] = the element of b matched to element i of a)."""
    a, b = (F.normalize(d.detach().float(), dim=0).cpu() for d in (dec_a, dec_b))
    cos = (a.T @ b).numpy()
    rows, partner = linear_sum_assignment(cos, maximize=True)  # rows is 0..n-1 in order
    return float((cos[rows, partner] > threshold).mean()), partner


def top_token_overlap(ids_a, ids_b, partner):
    """Mean Jaccard overlap of the top-token sets (analysis tables' top_ids) of element i of a and
    element partner[i] of b, over the pairs where both fire."""
    scores = []
    for i, j in enumerate(partner):
        a, b = set(ids_a[:, i].tolist()) - {-1}, set(ids_b[:, j].tolist()) - {-1}
        if a and b:
            scores.append(len(a & b) / len(a | b))
    return float(np.mean(scores)) if scores else None


def splice_costs(model, coders, tokens, ce_clean):
    """CE with each coder spliced in alone and with all at once, against zeroing the same MLPs:
    {layer or 'all': {ce, ppl, ce_zero, loss_recovered}}."""
    out = {}
    for key, group in [*((l, {l: c}) for l, c in coders.items()), ('all', coders)]:
        with attached(model, group, splice=True):
            ce = mean_ce(model, tokens)
        with zeroed(model, list(group)):
            ce_zero = mean_ce(model, tokens)
        out[key] = dict(ce=ce, ppl=math.exp(ce), ce_zero=ce_zero,
                        loss_recovered=(ce_zero - ce) / (ce_zero - ce_clean))
    return out
