"""
Attribution graphs by three routes on the same prompts, for RESULTS.md's comparison: the TopK LM's
own neurons (its dense tail as error nodes), its dense twin's neurons (every block's, exact but
dense) and the dense twin's post-hoc transcoders (sae.py's, their misses as error nodes).

    python -m toolkit.trace_compare --topk=out-toy --dense=out-toy-dense --transcoders=out-toy-dense/sae

The prompts are held-out sentences of the TopK run's val shard, each less its last word (which
the graph then explains): n_prompts of them, drawn with a fixed seed, at most max_tokens tokens
with <|endoftext|>. Per graph: replacement and completeness scores, the nodes and edges kept,
the correlation of predicted and measured intervention effects (trace.check), and the seconds
from prompt to checked graph (the model already loaded). Several run triples (one per seed) are
given as comma-separated lists in the same order; the rows go to --out as JSON, and a table per
route (mean +- s.d. over every graph, ranges for counts) is printed.
"""
import json
import os
import random
import re
import time

import numpy as np
import torch

from configurator import configure, die
from toolkit.common import load_checkpoint, load_model
from toolkit.data import atomic_write, decode, encode, read_shard, shard_paths
from toolkit.pruning import prune, scores
from toolkit.dictionary import attach_transcoders
from toolkit.trace import attribute, check

# -----------------------------------------------------------------------------
topk = ''  # TopK runs, comma-separated (one per seed)
dense = ''  # their dense twins, in the same order
transcoders = ''  # folders of the twins' transcoder_layerL.pt (sae.py's OUT_DIR/sae), in the same order
routes = 'topk,dense,transcoders'  # which routes to run
n_prompts = 20  # held-out sentences per run
max_tokens = 16  # a prompt's tokens with <|endoftext|>, at most
search_tokens = 200_000  # val tokens searched for sentences
prompt_seed = 0  # which sentences
node_threshold = 0.8
edge_threshold = 0.98
check_nodes = 20  # top neurons checked against the real model per graph
out = 'trace_compare.json'  # every graph's row
# -----------------------------------------------------------------------------


def held_out_prompts(data_dir, n, max_tokens, search_tokens, seed):
    """n prompts from the val shard's sentences (a capital first, a full stop last, 6-20 words, no
    quote or digit), each with its last word and the stop removed; drawn with seed, in a fixed order."""
    text = decode(read_shard(shard_paths(data_dir, 'val')[0])[:search_tokens].tolist())
    sentences = sorted({s.strip() for s in re.split(r'(?<=[.!?])\s+|\n|<\|endoftext\|>', text)})
    prompts = [s[:-1].rsplit(' ', 1)[0] for s in sentences
               if re.fullmatch(r'[A-Z][^"\d:;()]*[a-z]\.', s) and 6 <= len(s.split()) <= 20]
    prompts = [p for p in prompts if len(encode(p)) + 1 <= max_tokens]
    if len(prompts) < n:
        die(f"{data_dir}'s val shard has {len(prompts)} usable sentences in its first {search_tokens} tokens, "
            f"fewer than --n_prompts={n}; give more --search_tokens")
    return random.Random(seed).sample(prompts, n)


def graph_row(model, prompt, dense_neurons):
    """One graph, pruned, scored and checked: its row."""
    t0 = time.perf_counter()
    graph = attribute(model, torch.tensor([50256] + encode(prompt)), None, dense_neurons)
    keep, edges, node_influence = prune(graph, node_threshold, edge_threshold)
    replacement, completeness = scores(graph, node_influence)
    _, _, _, r = check(model, graph, node_influence, keep, check_nodes)
    n, e = graph['n_neurons'], graph['n_errors']
    return dict(prompt=prompt, replacement=replacement, completeness=completeness, r=r, seconds=time.perf_counter() - t0,
                nodes=n, errors=e, edges=int((graph['adjacency'] != 0).sum()), nodes_kept=int(keep[:n].sum()),
                errors_kept=int(keep[n:n + e].sum()), edges_kept=int(edges.sum()))


def route_model(route, topk_run, dense_run, folder):
    """(the model, dense_neurons) a route traces."""
    if route == 'topk':
        return load_model(topk_run, 'cpu')[0], False
    model = load_model(dense_run, 'cpu')[0]
    if route == 'transcoders':
        attach_transcoders(model, folder)
    return model, route == 'dense'


def summary(rows):
    """A table row's cells: mean +- s.d. of the scores and r, ranges of the counts, mean seconds."""
    col = lambda k: np.array([row[k] for row in rows], dtype=float)
    ms = lambda k: f"{col(k).mean():.3f} ± {col(k).std():.3f}"
    rng = lambda k: f"{int(col(k).min()):,}-{int(col(k).max()):,}"
    r = col('r')[~np.isnan(col('r'))]  # nan: a graph with fewer than 3 neurons to check
    checked = f"{r.mean():.3f} ± {r.std():.3f} (median {np.median(r):.2f}, {len(r)} graphs)" if len(r) else "none"
    seconds = col('seconds')
    return [ms('replacement'), ms('completeness'), rng('nodes_kept'), rng('errors_kept'), rng('edges_kept'), checked,
            f"{seconds.mean():.1f} ({seconds.min():.1f}-{seconds.max():.1f})"]


def main():
    configure(globals())
    runs = [s.split(',') if s else [] for s in (topk, dense, transcoders)]
    wanted = routes.split(',')
    if not runs[0] or any(r not in ('topk', 'dense', 'transcoders') for r in wanted):
        die(f"give --topk=RUN[,RUN...] and --routes from topk, dense, transcoders (got --routes={routes})")
    needs = {'dense': 1, 'transcoders': 2}
    for route in wanted:
        if route in needs and any(len(runs[i]) != len(runs[0]) for i in range(1, needs[route] + 1)):
            die(f"--routes={route} needs --dense (and for transcoders --transcoders) with one entry per --topk run")
    rows = []
    for i, run in enumerate(runs[0]):
        data_dir = load_checkpoint(os.path.join(run, 'ckpt.pt'))['config']['data_dir']
        prompts = held_out_prompts(data_dir, n_prompts, max_tokens, search_tokens, prompt_seed)
        for route in wanted:
            model, dense_neurons = route_model(route, run, *(r[i] if len(r) > i else '' for r in runs[1:]))
            for prompt in prompts:
                rows.append(dict(run=run, route=route, **graph_row(model, prompt, dense_neurons)))
                print(json.dumps(rows[-1]), flush=True)
    atomic_write(out, lambda f: f.write(json.dumps(rows, indent=1).encode()))
    print("| route | replacement | completeness | nodes kept | error nodes kept | edges kept | r | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for route in wanted:
        print("| " + " | ".join([route] + summary([r for r in rows if r['route'] == route])) + " |")
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
