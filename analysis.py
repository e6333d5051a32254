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
dictionary = ''  # an SAE or transcoder file from sae.py: its latents take the place of its layer's neurons
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
def capture(model, layers, mlp_io=False):
    """Inside the block, captured[l] is the last activation tensor (B, T, d_ff) of layer l; with
    mlp_io, the (input, output) pair of the layer's whole MLP instead, each (B, T, n_embd): what a
    transcoder maps from and to, and what an SAE reconstructs (the output)."""
    captured = {}
    modules = [model.transformer.h[l].mlp if mlp_io else mlp_acts(model)[l] for l in layers]
    hooks = [m.register_forward_hook(lambda mod, inp, out, l=l: captured.__setitem__(
        l, (inp[0].detach(), out.detach()) if mlp_io else out.detach())) for l, m in zip(layers, modules)]
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
def collect(model, tokens, layers, top_m, batch_size=16, marks=None):
    """Stream tokens (n_seq, T) through the model; per layer, per neuron: the top_m activations
    and their positions (flat indices into tokens), firing count, sum of positive activations,
    and that sum over each set of marked positions in `marks` ({name: bool (n_seq, T) tensor},
    e.g. concept_marks()). Memory stays O(top_m * d_ff) per layer whatever the number of tokens."""
    dev = next(model.parameters()).device
    marks = marks or {}
    stats = {}
    with capture(model, layers) as captured:
        for b0 in range(0, len(tokens), batch_size):
            model(tokens[b0:b0 + batch_size].to(dev))
            pos = torch.arange(b0 * tokens.size(1), (b0 + len(captured[layers[0]])) * tokens.size(1))
            batch_marks = {name: m[b0:b0 + batch_size].flatten().float() for name, m in marks.items()}
            for l in layers:
                a = captured[l].flatten(0, 1).float().cpu()  # (tokens in batch, d_ff)
                s = stats.setdefault(l, dict(
                    values=torch.full((top_m, a.size(1)), -math.inf), positions=torch.full((top_m, a.size(1)), -1),
                    fires=torch.zeros(a.size(1)), sum=torch.zeros(a.size(1)), n_tokens=0, topk=is_topk(model, l),
                    mark_sum={name: torch.zeros(a.size(1)) for name in marks}, mark_count=dict.fromkeys(marks, 0)))
                # the running top-M: the best of (previous top-M, this batch), per neuron
                vals, idx = torch.cat([s["values"], a]).topk(top_m, dim=0)
                old = idx < top_m  # still one of the previous top-M, else this batch's row idx - M
                s["positions"] = torch.where(old, s["positions"].gather(0, idx.clamp(max=top_m - 1)),
                                             pos[(idx - top_m).clamp(min=0)])
                s["values"] = vals
                s["fires"] += (a > 0).sum(0)
                on = a.clamp(min=0)  # activation mass: what the neuron does when it fires
                s["sum"] += on.sum(0)
                s["n_tokens"] += len(a)
                for name, m in batch_marks.items():
                    s["mark_sum"][name] += m @ on
                    s["mark_count"][name] += int(m.sum())
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


def mean_over_firing(x):
    """The mean of a per-neuron number over the neurons that fire (dead ones have nan entropy);
    None (JSON null) if none does."""
    m = x.nanmean().item()
    return None if m != m else m


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


def decoder_directions(model, layer):
    """(n_embd, d_ff): what each neuron of the layer writes into the residual stream per unit of
    activation, its c_proj column (for an SAE or transcoder attached by sae.py, its decoder's)."""
    return model.transformer.h[layer].mlp.c_proj.weight


def unembedded(model, layer):
    """The decoder directions through ln_f's linear part, d - mean(d) times its gain (module
    docstring): their dot product with a token's lm_head row is the logit they add to it."""
    d = decoder_directions(model, layer)
    return (d - d.mean(0)) * model.transformer.ln_f.weight[:, None]


@torch.no_grad()
def promoted_tokens(model, layer, j, n=8):
    logits = model.lm_head.weight[:EOT + 1] @ unembedded(model, layer)[:, j]  # rows past EOT are padding
    return logits.topk(n).indices.tolist()


# -----------------------------------------------------------------------------
# concept search (SPEC section 3): which neuron to steer for a concept named by words. A neuron
# can read a concept (fire on its tokens), predict it (fire just before them) or write it (raise
# their logits); each signal proposes candidates, and steering them decides.


def concept_marks(tokens, concept_ids):
    """The positions collect() sums over for the signals: the concept's tokens, and the positions
    whose next token is one (the last of a row has no next token in view: not marked)."""
    concept = torch.isin(tokens, torch.as_tensor(concept_ids))
    before = torch.zeros_like(concept)
    before[:, :-1] = concept[:, 1:]
    return {"concept": concept, "next_is_concept": before}


def selectivity(s, mark):
    """Per neuron: (mean activation on the marked positions - mean elsewhere) / its max activation.
    High when it is strongly on for the marked positions in general, not just some of them, and
    off elsewhere; dividing by the max makes neurons of different scales comparable."""
    n_on = s["mark_count"][mark]
    on = s["mark_sum"][mark] / max(n_on, 1)
    off = (s["sum"] - s["mark_sum"][mark]) / max(s["n_tokens"] - n_on, 1)
    return (on - off) / s["values"][0].clamp(min=1e-9)


def reads(s):
    """What a neuron reads: how selectively it fires on the concept's own tokens."""
    return selectivity(s, "concept")


def predicts(s):
    """What a neuron predicts: how selectively it fires where the next token is the concept's.
    Often the useful signal in a language model: a neuron active before a word is one the model
    uses to produce the word."""
    return selectivity(s, "next_is_concept")


@torch.no_grad()
def writes(model, layer, concept_ids):
    """What a neuron writes: how much its decoder direction, through ln_f and lm_head, raises the
    concept tokens' logits above the average token's, in standard deviations of the logits it
    gives all tokens (so the length of the direction does not matter). It ignores the blocks
    between the layer and the output; the steering trial then takes them into account."""
    d = unembedded(model, layer).float()
    U = model.lm_head.weight[:EOT + 1].float()
    U = U - U.mean(0)  # logits relative to the average token
    spread = ((U @ d) ** 2).mean(0).sqrt()  # each direction's std of logits over tokens
    return (U[torch.as_tensor(concept_ids)].mean(0) @ d) / spread.clamp(min=1e-9)


@torch.no_grad()
def concept_probability(model, rows, concept_ids, positions=4096):
    """The next-token probability of the concept's tokens, summed over them, averaged over every
    position of the rows; a few rows at a time, so at most ~positions x vocabulary logits live."""
    total, step = 0.0, max(1, positions // rows.size(1))
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        logits, _ = model(chunk[:, :-1], chunk[:, 1:])  # with targets: logits at every position
        logits = logits.float()
        total += (logits[..., concept_ids].logsumexp(-1) - logits.logsumexp(-1)).exp().sum().item()
    return total / (len(rows) * (rows.size(1) - 1))


@torch.no_grad()
def concept_candidates(model, stats, concept_ids, trial, strength, candidates):
    """Neurons to steer toward a concept, best first. Candidates: in each layer of `stats` (collect()
    with concept_marks()), the `candidates` best neurons by each signal (reads, predicts, writes).
    Each one is steered to strength(its max activation) on the `trial` sequences and ranked by the
    next-token probability it gives the concept's tokens (mean over all positions): a neuron can
    read or predict a concept without promoting it, and the signals do not compare neurons of
    different layers. Returns a list of dicts (probability, layer, neuron, the signals that proposed
    it, its score by each signal); empty when no candidate ever fires."""
    concept_ids = torch.as_tensor(concept_ids, device=trial.device)
    tried = []
    for l, s in stats.items():
        scores = {"reads": reads(s), "predicts": predicts(s), "writes": writes(model, l, concept_ids).cpu()}
        proposed = {}
        for name, score in scores.items():
            for j in score.topk(min(candidates, len(score))).indices.tolist():
                proposed.setdefault(j, []).append(name)
        for j, signals in proposed.items():
            peak = s["values"][0, j].item()
            if peak <= 0:
                continue
            with steering(model, l, j, strength(peak)):
                p = concept_probability(model, trial, concept_ids)
            tried.append(dict(probability=p, layer=l, neuron=j, peak=peak, signals=signals,
                              scores={name: score[j].item() for name, score in scores.items()}))
    return sorted(tried, key=lambda c: -c["probability"])


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
    mlp = model.transformer.h[layer].mlp
    kind = getattr(mlp, "label", None) or (f"TopK (k = {mlp.act.k})" if is_topk(model, layer) else "dense GELU")
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
    n_layer = len(model.transformer.h)
    if not 0 <= l < n_layer:
        die(f"{flag}: layer {l} out of range [0, {n_layer - 1}]")
    n = decoder_directions(model, l).size(1)
    if not 0 <= j < n:
        die(f"{flag}: neuron {j} out of range [0, {n - 1}]")
    return l, j


def main():
    configure(globals())
    model, ckpt = load_model(out_dir, resolve_device(device))
    n_layer, page = len(model.transformer.h), "neurons_layer{}.html"
    site = None
    if dictionary:  # the same code reads a dictionary's latents, attached in place of the layer's neurons
        from sae import attach_file
        site = attach_file(model, dictionary)
        page = os.path.basename(dictionary).removesuffix(".pt") + ".html"
    if neuron:
        l, j = parse_neuron(neuron, model)
    elif 0 <= layer < n_layer or site is not None:
        l = layer if layer != -1 else site
    else:
        die(f"give --neuron=L:J or --layer=L with L in [0, {n_layer - 1}]")
    if site is not None and l != site:
        die(f"--dictionary={dictionary} sits at layer {site}, not at layer {l}")
    tokens = run_eval_tokens(eval_data, ckpt, eval_tokens, model.config.block_size)
    cluster_of = semantic_clusters(model.transformer.wte.weight, tokens, n_clusters, seed)
    stats, tables = analyse(model, tokens, [l], top_m, cluster_of, batch_size)
    if neuron:
        print(neuron_summary(model, tables[l], l, j))
        print("\n".join(contexts_text(tokens, stats[l], j)) or "  (never fires)")
    else:
        run_dir = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
        path = os.path.join(run_dir, "analysis", page.format(l))
        write_page(path, model, tokens, l, stats[l], tables[l])
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
