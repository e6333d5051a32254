"""
What the neurons of a TopK LM (or its dense twin) respond to, and the one place where their
activations are collected; steer.py and entropy.py import it.

    python analysis.py --out_dir=out-toy --neuron=1:42    # one neuron as text
    python analysis.py --out_dir=out-toy --layer=1        # out-toy/analysis/neurons_layer1.html

Definitions (SPEC section 3), in the code below:
* neuron (l, j): unit j of the output of transformer.h[l].mlp.act, read with a forward hook.
* fires: activation > 0. In a TopK block at alpha = 0 that means kept among the k (and a
  positive pre-activation: GELU turns a negative one into a small negative number that is not
  "on"); in a dense block, a positive pre-activation. One rule for both keeps them comparable.
* token entropy / semantic entropy (bits): over the neuron's top-M activating positions where
  it fires, of the token ids / of their k-means clusters in a reference embedding.
* promoted tokens: the neuron's decoder direction d = c_proj.weight[:, j] through ln_f and
  lm_head. ln_f acts on a direction through its linear part: d - mean(d), times ln_f's gain.
  Its division by the residual's norm is a positive scale per token that changes no ranking,
  and its bias is the same for every neuron, so both are left out.
"""
import contextlib
import html
import math
import os

import numpy as np
import torch

from common import EOT, atomic_write, decode, encode, load_model, read_shard, resolve_device, shard_paths
from configurator import configure, die

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run (its ckpt.pt) or a checkpoint file
neuron = ''  # L:J prints neuron J of layer L as text
layer = -1  # writes the neuron page of this layer to OUT_DIR/analysis/neurons_layer{L}.html
eval_data = ''  # val shards of this data dir, or a .txt file; '' = the run's data_dir
eval_tokens = 32768  # N: evaluation tokens
top_m = 32  # M: top-activating positions kept per neuron
n_clusters = 64  # k-means clusters of the embedding, for semantic entropy
seed = 1337  # k-means initialisation
batch_size = 16  # sequences per forward pass
device = 'auto'
# -----------------------------------------------------------------------------


def load_eval_tokens(source, n_tokens, seq_len):
    """The first n_tokens of a data dir's val shards (or of a .txt file, after <|endoftext|>)
    as (n_seq, seq_len) rows; always the same tokens, so checkpoints and runs compare."""
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            tokens = np.array([EOT] + encode(f.read()))
    else:
        tokens = np.concatenate([read_shard(p) for p in shard_paths(source, "val")])
    n_seq = min(n_tokens, len(tokens)) // seq_len
    if n_seq == 0:
        die(f"{source} has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    return torch.from_numpy(tokens[:n_seq * seq_len].astype(np.int64)).view(n_seq, seq_len)


def run_eval_tokens(eval_data, ckpt, n_tokens, seq_len):
    """load_eval_tokens from --eval_data, or by default from the val shards the run trained with."""
    return load_eval_tokens(eval_data or ckpt.get("config", {}).get("data_dir", ""), n_tokens, seq_len)


def mlp_acts(model):
    return [block.mlp.act for block in model.transformer.h]


def is_topk(model, layer):
    return hasattr(mlp_acts(model)[layer], "k")


@contextlib.contextmanager
def capture(model, layers):
    """Inside the block, captured[l] is the last activation tensor (B, T, d_ff) of layer l."""
    captured = {}
    hooks = [mlp_acts(model)[l].register_forward_hook(
        lambda mod, inp, out, l=l: captured.__setitem__(l, out.detach())) for l in layers]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def steering(model, layer, neuron, value):
    """Set neuron (layer, neuron) to value at every position, after the TopK mask. value=None
    leaves it as it is, but like any hook sends the block through the reference path (see
    sparse_mlp.applies): a baseline run that way differs from a steered one by the steering
    alone, not by float rounding."""
    def hook(module, inp, out):
        if value is None:
            return None  # a hook that returns None keeps the module's output
        out = out.clone()
        out[..., neuron] = value
        return out  # a hook's return value replaces the module's output
    handle = mlp_acts(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def collect(model, tokens, layers, top_m, batch_size=16, marked=None):
    """Stream tokens (n_seq, T) through the model; per layer, per neuron: the top_m activations
    and their positions (flat indices into tokens), firing count, sum of positive activations,
    and that sum over the `marked` positions (a bool (n_seq, T) tensor, e.g. concept words).
    Memory stays O(top_m * d_ff) per layer whatever the number of tokens."""
    dev = next(model.parameters()).device
    stats = {}
    with capture(model, layers) as captured:
        for b0 in range(0, len(tokens), batch_size):
            model(tokens[b0:b0 + batch_size].to(dev))
            pos = torch.arange(b0 * tokens.size(1), (b0 + len(captured[layers[0]])) * tokens.size(1))
            mark = (marked[b0:b0 + batch_size].flatten() if marked is not None else
                    torch.zeros(len(pos), dtype=torch.bool)).float()
            for l in layers:
                a = captured[l].flatten(0, 1).float().cpu()  # (tokens in batch, d_ff)
                s = stats.setdefault(l, dict(
                    values=torch.full((top_m, a.size(1)), -math.inf), positions=torch.full((top_m, a.size(1)), -1),
                    fires=torch.zeros(a.size(1)), sum=torch.zeros(a.size(1)), marked_sum=torch.zeros(a.size(1)),
                    n_tokens=0, n_marked=0, topk=is_topk(model, l)))
                # the running top-M: the best of (previous top-M, this batch), per neuron
                vals, idx = torch.cat([s["values"], a]).topk(top_m, dim=0)
                old = idx < top_m  # still one of the previous top-M, else this batch's row idx - M
                s["positions"] = torch.where(old, s["positions"].gather(0, idx.clamp(max=top_m - 1)),
                                             pos[(idx - top_m).clamp(min=0)])
                s["values"] = vals
                s["fires"] += (a > 0).sum(0)
                on = a.clamp(min=0)  # activation mass: what the neuron does when it fires
                s["sum"] += on.sum(0)
                s["marked_sum"] += mark @ on
                s["n_tokens"] += len(a)
                s["n_marked"] += int(mark.sum())
    return stats


def column_entropy(labels, valid):
    """Shannon entropy in bits of the labels (>= 0) in each column, counting valid entries only;
    nan for a column with none. Sorting puts equal labels in runs; a run's length is a count."""
    labels = torch.where(valid, labels, -1).sort(dim=0).values
    new_run = torch.ones_like(valid)
    new_run[1:] = labels[1:] != labels[:-1]
    run = new_run.long().cumsum(0) - 1
    counts = torch.zeros(labels.shape).scatter_add_(0, run, (labels >= 0).float())
    p = counts / counts.sum(0)
    return torch.special.xlogy(p, 1 / p).sum(0) / math.log(2)  # sum p log(1/p)


def kmeans(x, k, seed, iters=30):
    """Cluster the rows of x into k groups: k-means++ initialisation from a seeded generator,
    then a fixed number of Lloyd iterations, so the same x and seed give the same clusters."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    centres = x[torch.randint(len(x), (1,), generator=g)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):  # the next centre is likely far from all chosen ones
        centres = torch.cat([centres, x[torch.multinomial(d2 + 1e-12, 1, generator=g)]])
        d2 = torch.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k)[:, None]
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # empty: stays
    return torch.cdist(x, centres).argmin(1)


def semantic_clusters(wte, tokens, n_clusters, seed):
    """cluster_of[token id] for every token type in tokens (-1 elsewhere): k-means on their
    embedding rows, unit-normalised (similar meaning = similar direction). Only types that occur
    are clustered: the rows of tokens a run never saw are untrained noise."""
    types = tokens.unique()
    x = torch.nn.functional.normalize(wte[types].float().cpu(), dim=1)
    cluster_of = torch.full((wte.size(0),), -1, dtype=torch.long)
    cluster_of[types] = kmeans(x, n_clusters, seed)
    return cluster_of


def neuron_table(s, tokens, cluster_of):
    """Per-neuron numbers of one layer from collect()'s stats."""
    fired = s["values"] > 0
    ids = tokens.flatten()[s["positions"].clamp(min=0)]
    return dict(freq=s["fires"] / s["n_tokens"], max=s["values"][0], dead=s["fires"] == 0,
                h_tok=column_entropy(ids, fired), h_sem=column_entropy(cluster_of[ids], fired),
                top_ids=torch.where(fired, ids, -1))  # (M, d_ff) token ids, -1 where not firing


def specificity_order(table):
    """Neurons that fire, most specific first: lowest token entropy, then the most frequent."""
    alive = (~table["dead"]).nonzero().flatten()
    key = table["h_tok"][alive] * 1e6 - table["freq"][alive]
    return alive[key.argsort()].tolist()


def selectivity(s):
    """Per neuron: (mean activation on the marked tokens - mean elsewhere) / its max activation.
    High when it is strongly on for the marked words in general, not just one of them, and off
    elsewhere; dividing by the max makes neurons of different scales comparable."""
    on = s['marked_sum'] / max(s['n_marked'], 1)
    off = (s['sum'] - s['marked_sum']) / max(s['n_tokens'] - s['n_marked'], 1)
    return (on - off) / s['values'][0].clamp(min=1e-9)


@torch.no_grad()
def concept_neuron(model, stats, concept_ids, trial, strength, candidates):
    """The neuron to steer toward a concept, in two steps. What it reads: in each layer of
    `stats` (from collect() with the concept's tokens marked), the `candidates` most selective
    neurons. What it writes: each is steered to strength(its max activation) on the `trial`
    sequences, and the one that gives the concept's tokens the most next-token probability wins.
    The second step matters because a neuron can detect a concept without promoting it, and
    selectivity does not compare neurons of different layers.
    Returns (probability, layer, neuron, selectivity), or None when no candidate ever fires."""
    concept_ids = torch.as_tensor(concept_ids, device=trial.device)
    best = None
    for l, s in stats.items():
        score, peak = selectivity(s), s['values'][0]
        for j in score.topk(min(candidates, len(score))).indices.tolist():
            if peak[j] <= 0:
                continue
            with steering(model, l, j, strength(peak[j].item())):
                logits, _ = model(trial)
            p = logits.float().softmax(-1)[..., concept_ids].sum(-1).mean().item()
            if best is None or p > best[0]:
                best = (p, l, j, score[j].item())
    return best


@torch.no_grad()
def promoted_tokens(model, layer, j, n=8):
    d = model.transformer.h[layer].mlp.c_proj.weight[:, j]
    d = (d - d.mean()) * model.transformer.ln_f.weight  # ln_f's linear part (module docstring)
    logits = model.lm_head.weight[:EOT + 1] @ d  # rows past EOT are vocabulary padding
    return logits.topk(n).indices.tolist()


@torch.no_grad()
def window_acts(model, tokens, layer, neurons, positions, before, after, batch_size=16):
    """Activation of neurons[i] on the tokens from before to after the position positions[i]
    (the firing token at column `before`); nan outside its sequence. Only the sequences that
    hold a window are run, a batch at a time."""
    T = tokens.size(1)
    neurons, positions = torch.tensor(neurons), torch.tensor(positions)
    rows, cols = positions // T, (positions % T - before)[:, None] + torch.arange(before + after + 1)
    out = torch.full(cols.shape, math.nan)
    needed = rows.unique()
    with capture(model, [layer]) as captured:
        for i in range(0, len(needed), batch_size):
            batch = needed[i:i + batch_size]
            model(tokens[batch].to(next(model.parameters()).device))
            acts = captured[layer].float().cpu()
            where = torch.full((len(tokens),), -1)
            where[batch] = torch.arange(len(batch))
            sel = (where[rows] >= 0).nonzero().flatten()
            v = acts[where[rows[sel]][:, None], cols[sel].clamp(0, T - 1), neurons[sel][:, None]]
            out[sel] = torch.where((cols[sel] >= 0) & (cols[sel] < T), v, math.nan)
    return out


def neuron_summary(model, table, layer, j):
    return (f"layer {layer} neuron {j}: fires on {100 * table['freq'][j]:.2f}% of tokens, max {table['max'][j]:.3f}, "
            f"token entropy {table['h_tok'][j]:.2f} bits, semantic entropy {table['h_sem'][j]:.2f} bits\n"
            f"  promotes: {' | '.join(repr(decode([t])) for t in promoted_tokens(model, layer, j))}")


def contexts_text(tokens, s, j, n=8, before=12, after=4):
    """The neuron's top n contexts as text lines, the firing token in [[ ]]."""
    flat, T, lines = tokens.flatten(), tokens.size(1), []
    for v, p in zip(s["values"][:n, j].tolist(), s["positions"][:n, j].tolist()):
        if v <= 0:
            break
        lo, hi = p - min(before, p % T), p + min(after, T - 1 - p % T)
        text = decode(flat[lo:p].tolist()) + "[[" + decode([flat[p]]) + "]]" + decode(flat[p + 1:hi + 1].tolist())
        lines.append(f"  {v:7.3f}  {text!r}")
    return lines


PAGE_HEAD = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;margin:2em;max-width:70em}} .n{{border-top:1px solid #ccc;padding:.5em 0}}
.c{{font-family:monospace;white-space:pre-wrap;margin:.15em 0}} .c span{{border-radius:2px}}
.f{{outline:2px solid #c00}} .meta{{color:#555;font-size:90%}}</style></head><body><h1>{title}</h1>
<p>{intro}</p><p><input id="q" placeholder="find a neuron by a token (e.g. job)" size="40"
oninput="for(const d of document.querySelectorAll('.n'))d.style.display=d.dataset.t.includes(this.value.trim().toLowerCase())?'':'none'"></p>
"""


def write_page(path, model, tokens, layer, s, table, n_contexts=8, before=12, after=4):
    """A self-contained HTML page of a layer's neurons, most specific first: top contexts shaded
    by the neuron's activation (firing token outlined), entropies, and promoted tokens."""
    order = specificity_order(table)
    shown = [(j, s["positions"][r, j].item()) for j in order
             for r in range(min(n_contexts, len(s["values"]))) if s["values"][r, j] > 0]
    acts = window_acts(model, tokens, layer, [j for j, _ in shown], [p for _, p in shown], before, after)
    contexts = {j: [] for j in order}
    for (j, p), a in zip(shown, acts):
        contexts[j].append((p, a))
    flat, esc = tokens.flatten(), html.escape
    kind = f"TopK (k = {mlp_acts(model)[layer].k})" if is_topk(model, layer) else "dense GELU"
    intro = (f"{kind} MLP, {len(order)} of {len(table['dead'])} neurons fire on {tokens.numel():,} evaluation tokens "
             f"(top {len(s['values'])} positions kept per neuron). Entropies in bits over those positions.")
    parts = [PAGE_HEAD.format(title=f"Neurons of layer {layer}", intro=esc(intro))]
    for j in order:
        words = " ".join(decode([flat[p]]).strip().lower() for p, _ in contexts[j])
        promoted = " ".join(f"<code>{esc(repr(decode([t])))}</code>" for t in promoted_tokens(model, layer, j))
        parts.append(f'<div class="n" data-t="{esc(words)}"><b>neuron {layer}:{j}</b> <span class="meta">'
                     f"fires on {100 * table['freq'][j]:.2f}% of tokens, max {table['max'][j]:.3f}, "
                     f"token entropy {table['h_tok'][j]:.2f}, semantic entropy {table['h_sem'][j]:.2f}</span>"
                     f'<div class="meta">promotes: {promoted}</div>')
        for p, a in contexts[j]:
            spans = []
            for c, v in enumerate(a.tolist()):
                if math.isnan(v):  # past the start or end of the sequence
                    continue
                text = esc(decode([flat[p - before + c]]))
                if v <= 0 and c != before:  # most tokens: plain text keeps the page small
                    spans.append(text)
                    continue
                shade = max(0.0, v) / max(table["max"][j].item(), 1e-9)
                spans.append(f'<span{" class=f" if c == before else ""} title="{v:.3f}" '
                             f'style="background:rgba(255,140,0,{shade:.2f})">{text}</span>')
            parts.append(f'<div class="c">{"".join(spans)}</div>')
        parts.append("</div>")
    parts.append("</body></html>\n")
    atomic_write(path, lambda f: f.write("\n".join(parts).encode("utf-8")))


def analyse(model, tokens, layers, top_m, cluster_of, batch_size=16):
    """collect() and every neuron's numbers: ({layer: stats}, {layer: table})."""
    stats = collect(model, tokens, layers, top_m, batch_size)
    return stats, {l: neuron_table(stats[l], tokens, cluster_of) for l in layers}


def parse_neuron(spec, model, flag="--neuron"):
    """LAYER:NEURON of a neuron of model, checked against its shape."""
    try:
        l, j = (int(x) for x in spec.split(":"))
    except ValueError:
        die(f"{flag} expects LAYER:NEURON, e.g. 1:42, got {spec!r}")
    n_layer, d_ff = len(model.transformer.h), 4 * model.config.n_embd
    if not 0 <= l < n_layer:
        die(f"{flag}: layer {l} out of range [0, {n_layer - 1}]")
    if not 0 <= j < d_ff:
        die(f"{flag}: neuron {j} out of range [0, {d_ff - 1}]")
    return l, j


def main():
    configure(globals())
    model, ckpt = load_model(out_dir, resolve_device(device))
    n_layer = len(model.transformer.h)
    if neuron:
        l, j = parse_neuron(neuron, model)
    elif 0 <= layer < n_layer:
        l = layer
    else:
        die(f"give --neuron=L:J or --layer=L with L in [0, {n_layer - 1}]")
    tokens = run_eval_tokens(eval_data, ckpt, eval_tokens, model.config.block_size)
    cluster_of = semantic_clusters(model.transformer.wte.weight, tokens, n_clusters, seed)
    stats, tables = analyse(model, tokens, [l], top_m, cluster_of, batch_size)
    if neuron:
        print(neuron_summary(model, tables[l], l, j))
        print("\n".join(contexts_text(tokens, stats[l], j)) or "  (never fires)")
    else:
        run_dir = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
        path = os.path.join(run_dir, "analysis", f"neurons_layer{l}.html")
        write_page(path, model, tokens, l, stats[l], tables[l])
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
