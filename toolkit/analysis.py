"""
What the neurons of a TopK LM (or its dense twin) respond to: entropies, semantic clusters,
neuron pages, and one neuron as text. entropy.py and sae.py use its tables.

    python -m toolkit.analysis --out_dir=out-toy --neuron=1:42    # one neuron as text
    python -m toolkit.analysis --out_dir=out-toy --layer=1        # out-toy/analysis/neurons_layer1.html

Definitions (neurons.py has those of a neuron, of firing and of the decoder direction):
* top contexts: over N evaluation tokens, the M positions where a neuron is largest.
* token entropy / semantic entropy (bits): over the neuron's top-M activating positions where
  it fires, the entropy of the token ids / of their k-means clusters in a reference embedding.
  Low token entropy: it fires on few token types; low semantic entropy: on one concept, even
  when the surface tokens differ.
* promoted tokens: the tokens whose logits the neuron's decoder direction raises most.
"""
import html
import math
import os

import torch

from configurator import at_least, configure, die
from toolkit.common import load_checkpoint, load_model, resolve_device, run_folder
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import atomic_write, decode
from toolkit.dictionary import attach_file
from toolkit.neurons import capture, collect, contexts_text, is_topk, parse_neuron, promoted_tokens, run_eval_tokens

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
reference = ''  # checkpoint or run whose wte defines the semantic clusters; '' = the final ckpt.pt of OUT_DIR's run
dictionary = ''  # an SAE or transcoder file from sae.py: its latents take the place of its layer's neurons
device = 'auto'
# -----------------------------------------------------------------------------


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


def reference_wte(out_dir, reference=''):
    """The embedding whose k-means clusters define semantic entropy: reference's (a checkpoint or a
    run), or else the final checkpoint's of out_dir's run (out_dir: a run or any of its checkpoints;
    a checkpoint with no ckpt.pt beside it is its own), so that every checkpoint of a run is read in
    one semantic space."""
    final = os.path.join(run_folder(out_dir), "ckpt.pt")
    source = reference or (final if os.path.exists(final) else out_dir)
    return load_checkpoint(source)["model"]["transformer.wte.weight"]


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


def top_token_ids(s, tokens):
    """(M, d_ff): the token id at each neuron's top-M positions in collect()'s stats, -1 where it
    does not fire."""
    return torch.where(s["values"] > 0, tokens.flatten()[s["positions"].clamp(min=0)], -1)


def neuron_table(s, tokens, cluster_of):
    """Per-neuron numbers of one layer from collect()'s stats."""
    fired = s["values"] > 0
    ids = tokens.flatten()[s["positions"].clamp(min=0)]
    return dict(freq=s["fires"] / s["n_tokens"], max=s["values"][0], dead=s["fires"] == 0,
                h_tok=column_entropy(ids, fired), h_sem=column_entropy(cluster_of[ids], fired),
                top_ids=top_token_ids(s, tokens))


def specificity_order(table):
    """Neurons that fire, most specific first: lowest token entropy, then the most frequent."""
    alive = (~table["dead"]).nonzero().flatten()
    key = table["h_tok"][alive] * 1e6 - table["freq"][alive]
    return alive[key.argsort()].tolist()


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


PAGE_HEAD = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;margin:2em;max-width:70em}} .n{{border-top:1px solid #ccc;padding:.5em 0}}
.c{{font-family:monospace;white-space:pre-wrap;margin:.15em 0}} .c span{{border-radius:2px}}
.f{{outline:2px solid #c00}} .meta{{color:#555;font-size:90%}}</style></head><body><h1>{title}</h1>
<p>{intro}</p><p><input id="q" placeholder="find a neuron by a token (e.g. job)" size="40"
oninput="for(const d of document.querySelectorAll('.n'))d.style.display=d.dataset.t.includes(this.value.trim().toLowerCase())?'':'none'"></p>
"""


def neuron_blocks(model, tokens, layer, s, table, order, n_contexts=8, before=12, after=4):
    """{j: HTML of neuron j} for the neurons in order: its top contexts shaded by its activation
    (firing token outlined), entropies and promoted tokens; one pass for all their windows."""
    shown = [(j, s["positions"][r, j].item()) for j in order
             for r in range(min(n_contexts, len(s["values"]))) if s["values"][r, j] > 0]
    acts = window_acts(model, tokens, layer, [j for j, _ in shown], [p for _, p in shown], before, after)
    contexts = {j: [] for j in order}
    for (j, p), a in zip(shown, acts):
        contexts[j].append((p, a))
    flat, esc, blocks = tokens.flatten(), html.escape, {}
    for j in order:
        words = " ".join(decode([flat[p]]).strip().lower() for p, _ in contexts[j])
        promoted = " ".join(f"<code>{esc(repr(decode([t])))}</code>" for t in promoted_tokens(model, layer, j))
        parts = [f'<div class="n" data-t="{esc(words)}"><b>neuron {layer}:{j}</b> <span class="meta">'
                 f"fires on {100 * table['freq'][j]:.2f}% of tokens, max {table['max'][j]:.3f}, "
                 f"token entropy {table['h_tok'][j]:.2f}, semantic entropy {table['h_sem'][j]:.2f}</span>"
                 f'<div class="meta">promotes: {promoted}</div>']
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
        blocks[j] = "\n".join(parts + ["</div>"])
    return blocks


def write_page(path, model, tokens, layer, s, table, n_contexts=8, before=12, after=4):
    """A self-contained HTML page of a layer's neurons, most specific first (neuron_blocks)."""
    order = specificity_order(table)
    mlp = model.transformer.h[layer].mlp
    kind = getattr(mlp, "label", None) or (f"TopK (k = {mlp.act.k})" if is_topk(model, layer) else "dense GELU")
    intro = (f"{kind} MLP, {len(order)} of {len(table['dead'])} neurons fire on {tokens.numel():,} evaluation tokens "
             f"(top {len(s['values'])} positions kept per neuron). Entropies in bits over those positions.")
    blocks = neuron_blocks(model, tokens, layer, s, table, order, n_contexts, before, after)
    parts = [PAGE_HEAD.format(title=f"Neurons of layer {layer}", intro=html.escape(intro)), *blocks.values(),
             "</body></html>\n"]
    atomic_write(path, lambda f: f.write("\n".join(parts).encode("utf-8")))


def analyse(model, tokens, layers, top_m, cluster_of, batch_size=16):
    """collect() and every neuron's numbers: ({layer: stats}, {layer: table})."""
    stats = collect(model, tokens, layers, top_m, batch_size)
    return stats, {l: neuron_table(stats[l], tokens, cluster_of) for l in layers}


def main():
    configure(globals())
    at_least(1, eval_tokens=eval_tokens, top_m=top_m, n_clusters=n_clusters, batch_size=batch_size)
    model, ckpt = load_model(out_dir, resolve_device(device))
    cpu_fast_paths(model)
    n_layer, page = len(model.transformer.h), "neurons_layer{}.html"
    site = None
    if dictionary:  # the same code reads a dictionary's latents, attached in place of the layer's neurons
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
    cluster_of = semantic_clusters(reference_wte(out_dir, reference), tokens, n_clusters, seed)
    stats, tables = analyse(model, tokens, [l], top_m, cluster_of, batch_size)
    if neuron:
        print(neuron_summary(model, tables[l], l, j))
        print("\n".join(contexts_text(tokens, stats[l], j)) or "  (never fires)")
    else:
        path = os.path.join(run_folder(out_dir), "analysis", page.format(l))
        write_page(path, model, tokens, l, stats[l], tables[l])
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
