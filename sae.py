"""
The post-hoc route the paper argues against, measured beside a TopK LM (SPEC section 6): a TopK
sparse autoencoder (or a transcoder) trained on the dense twin's MLP after the fact, with the same
dictionary budget as the TopK LM's neurons (n_latents = d_ff, the same k), at each TopK site.

    python sae.py --out_dir=out-toy-dense --compare=out-toy                 # train, then compare
    python sae.py --out_dir=out-toy-dense --compare=out-toy --kind=sae --layer=1
    python analysis.py --out_dir=out-toy-dense --dictionary=out-toy-dense/sae/sae_layer1.pt --layer=1

kind 'sae' reconstructs the MLP output of block l from itself; 'transcoder' predicts it from the
MLP input (ln_2's output), a post-hoc sparse MLP. The recipe (Gao et al. 2024; EleutherAI sparsify):

    z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc))     (a transcoder encodes x itself)
    x_hat = W_dec z + b_pre                          W_dec: unit-norm columns
    loss = |x - x_hat|^2 / var(x) + 1/32 * AuxK      Adam, lr = 2e-4 / sqrt(n_latents / 2^14)

b_pre starts at the mean of the first batch's targets, W_dec at W_enc^T with unit columns, and after
every step the columns are renormalised (their gradient's component along them is removed first,
so the step does not just fight the renormalisation). AuxK: the top k_aux = d_in / 2 pre-activations
of the dead latents (no firing in the last --dead_tokens tokens) reconstruct what the live ones
missed, which gives dead latents a gradient back to life.

A dictionary plugs into the dense twin as a block's `mlp` (DictionarySite) with the interface of an
MLP: `act` (its latents, hooked like neurons) and `c_proj` (its decoder), so analysis.py and
steer.py read and steer latents with the code they use for neurons (--dictionary=FILE).
"""
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import steer
from analysis import analyse, capture, run_eval_tokens, semantic_clusters
from common import (atomic_write, encode_prompt, load_model, read_shard, resolve_device,
                    run_checkpoints, shard_paths)
from configurator import configure, die

# -----------------------------------------------------------------------------
out_dir = 'out-dense'  # the dense twin (topk = 0) whose MLPs the dictionaries read; they go to OUT_DIR/sae/
compare = ''  # the TopK run: its k, its TopK layers (the sites) and its checkpoints
kind = 'both'  # 'sae', 'transcoder' or 'both'
layer = -1  # one site only; -1 = every layer the TopK run makes sparse
n_tokens = 1_000_000  # training tokens per dictionary (activations streamed from the train shards)
batch_size = 4096  # tokens per step
lr = 0.0  # Adam learning rate; 0 = 2e-4 / sqrt(n_latents / 2^14)
aux_coef = 1 / 32  # weight of the AuxK loss
dead_tokens = 100_000  # a latent that has not fired in this many training tokens is dead (AuxK)
seed = 0  # initialisation and data order
retrain = False  # retrain dictionaries that OUT_DIR/sae/ already holds with the same settings
stability = True  # also train a second seed, and a dictionary on an earlier checkpoint
early = 0.6  # the earlier checkpoint: the snapshot nearest this fraction of training
concept = ''  # words naming a concept: compare single-feature steering (steer.py's search) per route
eval_tokens = 32768  # fixed evaluation tokens (the run's val shards)
top_m = 32  # top-activating positions per feature, for the entropies
n_clusters = 64  # k-means clusters of the reference embedding (the TopK run's final wte)
device = 'auto'
# -----------------------------------------------------------------------------


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


# -----------------------------------------------------------------------------
# training on the dense twin's activations


def activation_batches(model, layers, data_dir, n_tokens, batch_tokens, seed):
    """{layer: (MLP input, MLP output)} rows for batches of random windows of the train shards."""
    shards = [read_shard(p) for p in shard_paths(data_dir, 'train')]
    T = model.config.block_size
    room = np.array([max(len(s) - T, 0) for s in shards])
    if not room.sum():
        die(f"the train shards in {data_dir} are no longer than block_size {T}")
    rng, n_seq = np.random.default_rng(seed), max(1, batch_tokens // T)
    dev = next(model.parameters()).device
    for _ in range(max(1, n_tokens // (n_seq * T))):
        which = rng.choice(len(shards), size=n_seq, p=room / room.sum())
        x = torch.stack([torch.from_numpy(shards[s][o:o + T].astype(np.int64))
                         for s, o in zip(which, (rng.integers(0, room[s]) for s in which))])
        with torch.no_grad(), capture(model, layers, mlp_io=True) as io:
            model(x.to(dev))
        yield {l: (h.flatten(0, 1), y.flatten(0, 1)) for l, (h, y) in io.items()}


def initial_coders(d_in, n_latents, k, kind, seed, layers, dev='cpu'):
    """{layer: coder} as training starts them. Seeded once per (kind, seed) and built for every layer
    up to the last in order, so layer l starts the same whichever other layers train with it."""
    torch.manual_seed(seed)
    built = [SparseCoder(d_in, n_latents, k, kind == 'transcoder') for _ in range(max(layers) + 1)]
    return {l: built[l].to(dev) for l in layers}


def near_initialisation(coder, initial, threshold=0.7):
    """Fraction of latents whose decoder direction still has cosine > threshold with the one it
    started from: how far training moved the dictionary (random directions in d_in dimensions
    have cosine ~ 1/sqrt(d_in))."""
    cos = F.cosine_similarity(coder.decoder.weight.detach().float().cpu(), initial.decoder.weight.detach().float().cpu(), dim=0)
    return float((cos > threshold).float().mean())


def train_dictionaries(model, layers, specs, data_dir, k, settings, desc):
    """Train a coder per (kind, init seed) in specs and per layer, all in one pass over the data.
    Returns ({(kind, seed, layer): coder}, {(kind, seed): seconds}, tokens seen): the seconds of
    the pass's model forwards plus those of that spec's own steps, what training it alone takes."""
    from tqdm import tqdm  # installed with datasets
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
# measurements


@torch.no_grad()
def mean_ce(model, tokens, batch_size=16):
    """Mean next-token cross-entropy (nats) over every position of the token rows."""
    total, dev = 0.0, next(model.parameters()).device
    for b in range(0, len(tokens), batch_size):
        rows = tokens[b:b + batch_size].to(dev)
        _, loss = model(rows[:, :-1], rows[:, 1:])
        total += loss.item() * len(rows)
    return total / len(tokens)


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
    from scipy.optimize import linear_sum_assignment
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


def feature_summary(tables):
    """Mean L0 (active features per token), dead fraction and entropies of analysis tables."""
    def mean(x):
        m = x.nanmean().item()
        return None if m != m else m
    return dict(l0=tables['freq'].sum().item(), dead_fraction=tables['dead'].float().mean().item(),
                token_entropy=mean(tables['h_tok']), semantic_entropy=mean(tables['h_sem']))


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


def steering_result(model, tokens, layers, words):
    """steer.py's concept search and strength sweep over `layers` of model, with its defaults."""
    ids = steer.concept_token_ids(words)
    if not ids:
        die(f"--concept: none of {words} is a single GPT-2 token")
    _, found = steer.find_concept_candidates(model, tokens, ids, layers, steer.trial_strength(math.nan, math.nan),
                                             top_m, steer.candidates)
    prompt_ids = [encode_prompt(p) for p in steer.prompts.split('|')]
    settings = dict(num_samples=steer.num_samples, max_new_tokens=steer.max_new_tokens,
                    temperature=steer.temperature, top_k=steer.top_k, seed=steer.seed)
    results, win = steer.steer_finalists(model, steer.pick_finalists(found, steer.n_finalists), [float(s) for s in steer.scales.split(',')],
                                         prompt_ids, steer.hit_pattern(words), settings, steer.max_ppl_ratio)
    best, base, _, kept = results[win]
    return dict(layer=best['layer'], feature=best['neuron'], signals=best['signals'], scale=kept['scale'],
                baseline_hit_rate=base['hit_rate'], steered_hit_rate=kept['hit_rate'],
                baseline_ppl=base['ppl'], steered_ppl=kept['ppl'])


def plot_routes(path, result):
    """Mean token and semantic entropy of each route's features against its CE cost over the dense twin."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    routes = result['routes']
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ('token_entropy', 'semantic_entropy'), ('token entropy', 'semantic entropy')):
        for i, (name, r) in enumerate(routes.items()):
            ys = [v[key] for v in r['layers'].values() if v[key] is not None]
            ax.scatter([r['ce_cost']] * len(ys), ys, color=f'C{i}', alpha=0.4, s=15)
            ax.scatter([r['ce_cost']], [np.mean(ys)], color=f'C{i}', s=90, marker='D', label=name)
        ax.set_xlabel('CE cost over the dense twin (nats; post-hoc: all sites spliced)')
        ax.set_ylabel(f'mean {title} per feature (bits)')
        ax.set_title(f'{title}: layers (dots), mean (diamond)')
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=80))


def snapshot_near(run, fraction):
    """(iter, path) of the run's checkpoint nearest `fraction` of its training."""
    points = run_checkpoints(run)
    return min(points, key=lambda p: abs(p[0] - fraction * points[-1][0]))


def obtain_dictionaries(checkpoints, sites, wanted, k, settings, folder, main_seed, retrain, dev):
    """Every wanted (kind, init seed, checkpoint name) dictionary at every site, from its file in
    folder when one was trained with the same settings on the same checkpoint file (its size and
    modification time), else (or with retrain) trained, one pass per checkpoint, and
    saved. checkpoints: {name: (iter, path)}. Returns {(kind, seed, name, layer): coder} and
    {(kind, seed, name): training info}."""
    coders, training = {}, {}
    for name, (it, source) in checkpoints.items():
        expected = dict(settings, k=k, source_iter=it, source_stamp=f"{os.path.getsize(source)}-{os.stat(source).st_mtime_ns}")
        path = lambda kd, s, l: os.path.join(folder, f"{kd}_layer{l}" + (f"_seed{s}" if s != main_seed else "") +
                                             (f"_iter{it}" if name != 'final' else "") + ".pt")
        todo = []
        for kd, s in sorted({(kd, s) for kd, s, n in wanted if n == name}):
            for l in sites:
                if os.path.exists(path(kd, s, l)) and not retrain:
                    coder, meta = load_dictionary(path(kd, s, l), dev)
                    if {key: meta.get(key) for key in expected} == expected and meta['init_seed'] == s:
                        coders[kd, s, name, l], training[kd, s, name] = coder, meta['training']
                        continue
                    print(f"{path(kd, s, l)} was trained with other settings: training it again")
                todo.append((kd, s))
        todo = sorted(set(todo))
        if not todo:
            continue
        model, ckpt = load_model(source, dev)
        trained, seconds, tokens = train_dictionaries(model, sites, todo, ckpt['config']['data_dir'], k, settings,
                                                      f"{' + '.join(f'{kd} seed {s}' for kd, s in todo)}, iter {it}")
        for (kd, s, l), coder in trained.items():
            info = dict(tokens=tokens, seconds=seconds[kd, s], dictionaries=len(sites))
            meta = dict(expected, kind=kd, layer=l, d_in=coder.decoder.weight.size(0), model_args=model_shape(model),
                        n_latents=coder.decoder.weight.size(1), init_seed=s, source=source, training=info)
            save_dictionary(path(kd, s, l), coder, meta)
            coders[kd, s, name, l], training[kd, s, name] = coder, info
    return coders, training


def main():
    configure(globals())
    if not compare:
        die("give --compare=OUT_DIR of the TopK run whose budget and sites the dictionaries share")
    if kind not in ('sae', 'transcoder', 'both'):
        die(f"--kind must be sae, transcoder or both, got {kind!r}")
    for flag, v in (('n_tokens', n_tokens), ('batch_size', batch_size), ('dead_tokens', dead_tokens),
                    ('eval_tokens', eval_tokens), ('top_m', top_m), ('n_clusters', n_clusters)):
        if v < 1:
            die(f"--{flag} must be positive, got {v}")
    if lr < 0 or not 0 < early < 1:
        die(f"--lr must be >= 0 (0: the rule) and --early in (0, 1); got {lr} and {early}")
    dev = resolve_device(device)
    dense, dense_ckpt = load_model(out_dir, dev)
    topk_model, topk_ckpt = load_model(compare, dev)
    cfg = topk_model.config
    if dense.config.topk or not cfg.topk:
        die(f"--out_dir must be a dense run (topk = 0) and --compare a TopK run; their topk are "
            f"{dense.config.topk} and {cfg.topk}")
    shape = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
    if any(getattr(cfg, k) != getattr(dense.config, k) for k in shape):
        die(f"--compare={compare} and --out_dir={out_dir} are not twins: they differ in {', '.join(shape)}")
    sites = list(range(cfg.n_layer - cfg.n_nontopk))
    if layer != -1:
        if layer not in sites:
            die(f"--layer must be one of the TopK run's sparse layers {sites}, got {layer}")
        sites = [layer]
    kinds = ['sae', 'transcoder'] if kind == 'both' else [kind]
    wanted = [(kd, seed, 'final') for kd in kinds]
    if stability and 'sae' in kinds:
        wanted += [('sae', seed + 1, 'final'), ('sae', seed, 'early')]
    checkpoints = {'final': (dense_ckpt['iter_num'], os.path.join(out_dir, 'ckpt.pt'))}
    if stability:
        checkpoints['early'] = snapshot_near(out_dir, early)
        if checkpoints['early'][0] == dense_ckpt['iter_num'] or snapshot_near(compare, early)[0] == topk_ckpt['iter_num']:
            die(f"--stability needs an earlier checkpoint (a ckpt_*.pt near {early:g} of training) in both "
                f"{out_dir} and {compare}: train with --ckpt_interval, or give --stability=False")
    settings = dict(n_tokens=n_tokens, batch_size=batch_size, lr=lr, aux_coef=aux_coef, dead_tokens=dead_tokens,
                    seed=seed)
    folder = os.path.join(out_dir, 'sae')
    coders, training = obtain_dictionaries(checkpoints, sites, wanted, cfg.topk, settings, folder, seed, retrain, dev)

    tokens = run_eval_tokens('', dense_ckpt, eval_tokens, cfg.block_size)
    cluster_of = semantic_clusters(topk_ckpt['model']['transformer.wte.weight'], tokens, n_clusters, 1337)  # as entropy.py

    def tables_of(model, attach=None):
        with attached(model, attach or {}):
            return analyse(model, tokens, sites, top_m, cluster_of)[1]

    def main_coders(kd, name='final', s=seed):
        return {l: coders[kd, s, name, l] for l in sites}

    ce_dense, ce_topk = mean_ce(dense, tokens), mean_ce(topk_model, tokens)
    result = dict(eval_tokens=tokens.numel(), sites=sites, k=cfg.topk, n_latents=4 * cfg.n_embd,
                  dense=dict(ce=ce_dense, ppl=math.exp(ce_dense)), topk=dict(ce=ce_topk, ppl=math.exp(ce_topk)),
                  routes={}, stability={}, steering={})
    topk_tables = tables_of(topk_model)
    result['routes']['TopK LM neurons'] = dict(ce_cost=ce_topk - ce_dense, layers={
        l: feature_summary(t) for l, t in topk_tables.items()})
    result['routes']['dense twin neurons'] = dict(ce_cost=0.0, layers={
        l: feature_summary(t) for l, t in tables_of(dense).items()})
    route_tables = {}
    for kd in kinds:
        costs, fvu = splice_costs(dense, main_coders(kd), tokens, ce_dense), reconstruction(dense, main_coders(kd), tokens)
        route_tables[kd] = tables_of(dense, main_coders(kd))
        result['routes'][f'dense + {kd}'] = dict(
            ce_cost=costs['all']['ce'] - ce_dense, all_sites=costs['all'], training=training[kd, seed, 'final'],
            layers={l: dict(feature_summary(route_tables[kd][l]), fvu=fvu[l], **costs[l]) for l in sites})

    if stability and 'sae' in kinds:  # the same dictionary again? across seeds, and across checkpoints
        result['stability']['seeds'] = {l: shared_fraction(main_coders('sae')[l].decoder.weight,
                                                           main_coders('sae', s=seed + 1)[l].decoder.weight)[0] for l in sites}
        initial = initial_coders(cfg.n_embd, main_coders('sae')[sites[0]].encoder.out_features, cfg.topk, 'sae', seed, sites)
        result['stability']['near_initialisation'] = {l: near_initialisation(main_coders('sae')[l], initial[l])
                                                      for l in sites}
        early_iter, early_path = checkpoints['early']
        early_tables = tables_of(load_model(early_path, dev)[0], main_coders('sae', 'early'))
        topk_early_iter, topk_early_path = snapshot_near(compare, early)
        topk_early = load_model(topk_early_path, dev)[0]
        topk_early_tables = tables_of(topk_early)
        c = result['stability']['checkpoints'] = dict(
            dense_iters=[early_iter, dense_ckpt['iter_num']], topk_iters=[topk_early_iter, topk_ckpt['iter_num']],
            sae={}, topk={})
        for l in sites:
            shared, partner = shared_fraction(main_coders('sae', 'early')[l].decoder.weight, main_coders('sae')[l].decoder.weight)
            c['sae'][l] = dict(shared=shared, top_token_overlap=top_token_overlap(
                early_tables[l]['top_ids'], route_tables['sae'][l]['top_ids'], partner))
            before, after = (m.transformer.h[l].mlp.c_proj.weight for m in (topk_early, topk_model))
            same = np.arange(before.size(1))  # neuron j is neuron j: no matching
            c['topk'][l] = dict(shared=(F.cosine_similarity(before, after, dim=0) > 0.7).float().mean().item(),
                                top_token_overlap=top_token_overlap(topk_early_tables[l]['top_ids'],
                                                                    topk_tables[l]['top_ids'], same))

    if concept:
        words = concept.replace(',', ' ').split()
        result['steering']['concept'] = concept
        result['steering']['TopK LM neurons'] = steering_result(topk_model, tokens, sites, words)
        result['steering']['dense twin neurons'] = steering_result(dense, tokens, sites, words)
        for kd in kinds:
            with attached(dense, main_coders(kd)):
                result['steering'][f'dense + {kd}'] = steering_result(dense, tokens, sites, words)

    report(result)
    atomic_write(os.path.join(folder, 'comparison.json'), lambda f: f.write(json.dumps(result, indent=1).encode()))
    plot_routes(os.path.join(folder, 'comparison.png'), result)
    print(f"wrote {folder}/comparison.json and comparison.png")


def report(result):
    f = lambda v, p=3: '-' if v is None else f"{v:.{p}f}"
    print(f"\n{result['eval_tokens']:,} evaluation tokens; dictionaries of {result['n_latents']} latents, k = {result['k']}, "
          f"at layers {result['sites']}")
    print(f"dense twin: CE {f(result['dense']['ce'])} (ppl {f(result['dense']['ppl'], 2)}); "
          f"TopK LM: CE {f(result['topk']['ce'])} (ppl {f(result['topk']['ppl'], 2)})")
    print(f"{'route':<22}{'layer':>6}{'CE':>8}{'ppl':>8}{'recov.':>8}{'FVU':>7}{'L0':>7}{'dead':>7}{'H_tok':>7}{'H_sem':>7}")
    for name, r in result['routes'].items():
        for l, v in r['layers'].items():
            print(f"{name:<22}{l:>6}{f(v.get('ce')):>8}{f(v.get('ppl'), 2):>8}{f(v.get('loss_recovered')):>8}"
                  f"{f(v.get('fvu')):>7}{f(v['l0'], 1):>7}{f(v['dead_fraction'], 2):>7}{f(v['token_entropy'], 2):>7}"
                  f"{f(v['semantic_entropy'], 2):>7}")
        if 'all_sites' in r:
            a = r['all_sites']
            print(f"{name:<22}{'all':>6}{f(a['ce']):>8}{f(a['ppl'], 2):>8}{f(a['loss_recovered']):>8}   "
                  f"(training: {r['training']['tokens']:,} extra tokens, {r['training']['seconds']:.0f} s for "
                  f"its {r['training']['dictionaries']} dictionaries)")
    s = result['stability']
    if s:
        print("shared across seeds (SAE, cosine > 0.7 after matching): " +
              ", ".join(f"layer {l} {f(v, 2)}" for l, v in s['seeds'].items()))
        print("SAE latents still within cosine 0.7 of their initial direction: " +
              ", ".join(f"layer {l} {f(v, 2)}" for l, v in s['near_initialisation'].items()))
        c = s['checkpoints']
        print(f"shared across checkpoints (dense iter {c['dense_iters'][0]} -> {c['dense_iters'][1]}, SAE matched; "
              f"TopK iter {c['topk_iters'][0]} -> {c['topk_iters'][1]}, neuron j = neuron j):")
        for l in c['sae']:
            print(f"  layer {l}: SAE {f(c['sae'][l]['shared'], 2)} (top-token overlap {f(c['sae'][l]['top_token_overlap'], 2)}), "
                  f"TopK {f(c['topk'][l]['shared'], 2)} (top-token overlap {f(c['topk'][l]['top_token_overlap'], 2)})")
    for name, v in result['steering'].items():
        if name != 'concept':
            print(f"steering '{result['steering']['concept']}' with {name}: " + (
                  f"{v['layer']}:{v['feature']} ({'+'.join(v['signals'])}), scale {v['scale']:g}, hit rate "
                  f"{f(v['baseline_hit_rate'], 2)} -> {f(v['steered_hit_rate'], 2)}, ppl {f(v['baseline_ppl'], 2)} -> "
                  f"{f(v['steered_ppl'], 2)}"))


if __name__ == '__main__':
    main()
