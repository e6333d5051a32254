"""
Attribution graphs whose nodes are the TopK LM's own neurons: circuit tracing (Ameisen et al.
2025, "Circuit Tracing: Revealing Computational Graphs in Language Models") with no transcoder to
train. In a TopK block the MLP *is* a TopK transcoder of itself, so its neurons stand where the
transcoder's features would, with no reconstruction error; only the dense tail is left unread.

    python -m toolkit.trace --out_dir=out-toy --prompt="The chef added salt to the"

The same steps trace the routes a TopK LM is measured against (trace_compare.py): a dense twin's
neurons as nodes (--dense_neurons), or post-hoc transcoders in its MLPs' place (--transcoders),
their latents as nodes and what they miss of each MLP's output as error nodes.

The method, in the steps below:
1. record: one pass of the real model on the prompt keeps what the graph holds fixed, each
   LayerNorm's scale 1/sigma, each head's attention pattern, every MLP's pre-activations and
   activations, the logits.
2. frozen_forward: the local replacement model. With those fixed, the residual stream is a
   linear function of its sources (token embeddings, each neuron's activation times its c_proj
   column, each dense block's MLP output as one error vector per position), plus bias terms.
3. edges: A[t, s], the direct effect of source s on target t (a neuron's pre-activation, the input
   to its TopK selection, or a logit) through the residual stream and frozen attention only, one
   batched backward pass per chunk of targets. The frozen model is linear, so edges are exact:
   a target's incoming edges plus its bias terms are its value.
4. prune (pruning.py): nodes kept by their influence on the logits up to 80% cumulative, then edges up to 98%,
   influence being the sum over paths of row-normalised |A| weighted by the logits' probabilities.
5. scores: the replacement score (the share of the tokens' and errors' influence that is the
   tokens': what flows through readable nodes) and the completeness score (the share of
   influence-weighted incoming edges that are not from error nodes).
6. check: a node's predicted effect on the top logit (zeroing it in the frozen model, later
   neurons following linearly with frozen selection and GELU gain) against the real model's
   change when the neuron is zeroed at its position, for the pruned graph's top nodes.

Nodes are ordered as circuit-tracer orders them: neurons (by layer, position, index), error nodes
(layer by layer, one per position), token embeddings, logits.
"""
import json
import math
import os

import numpy as np
import torch
from torch.nn import functional as F

from configurator import at_least, configure, die
from model import trained_alpha
from toolkit.common import load_model, run_folder
from toolkit.data import atomic_write, decode, encode, encode_prompt
from toolkit.dictionary import attach_transcoders
from toolkit.graph_page import graph_json, neuron_notes, page
from toolkit.neurons import is_topk, run_eval_tokens
from toolkit.pruning import prune, scores

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to trace (its ckpt.pt), or a checkpoint file
prompt = 'The story began'  # the text whose next token is explained (after <|endoftext|>)
target = ''  # the next token to explain, e.g. " rain" (one token); '' = the likeliest, up to 95% and 10
dense_neurons = False  # the dense blocks' neurons as nodes too, instead of one error node per position
transcoders = ''  # a folder of sae.py's transcoder_layerL.pt for this dense run: their latents are the nodes
node_threshold = 0.8  # keep nodes up to this share of influence on the logits
edge_threshold = 0.98  # then edges up to this share
check_nodes = 20  # the pruned graph's most influential neurons checked against the real model
eval_data = ''  # data dir (val shards) or .txt file for the neurons' top contexts on the page; '' = the run's
eval_tokens = 32768  # evaluation tokens for the top contexts; 0 = none on the page
# -----------------------------------------------------------------------------


@torch.no_grad()
def record(model, idx):
    """What step 1 freezes, from the real model on idx (T,) at alpha = 0: per block, the
    LayerNorms' inverse scales (T,), the attention patterns (H, T, T), the pre-activations and
    activations (T, d_ff), the MLP output (T, C); ln_f's inverse scale; the last position's logits."""
    blocks, rec, hooks = model.transformer.h, dict(blocks=[]), []

    def inverse_scale(ln, x):
        return torch.rsqrt(x.var(-1, unbiased=False) + ln.eps)[0]

    for block in blocks:
        r = {}
        rec["blocks"].append(r)
        hooks += [
            block.ln_1.register_forward_pre_hook(lambda m, a, r=r: r.__setitem__("s1", inverse_scale(m, a[0]))),
            block.ln_2.register_forward_pre_hook(lambda m, a, r=r: r.__setitem__("s2", inverse_scale(m, a[0]))),
            block.attn.c_attn.register_forward_hook(
                lambda m, a, out, r=r, attn=block.attn: r.__setitem__("pattern", attention_pattern(attn, out[0]))),
            block.mlp.c_fc.register_forward_hook(lambda m, a, out, r=r: r.__setitem__("pre", out[0])),
            block.mlp.act.register_forward_hook(lambda m, a, out, r=r: r.__setitem__("act", out[0])),
            block.mlp.register_forward_hook(lambda m, a, out, r=r: r.__setitem__("mlp_out", out[0]))]
    hooks.append(model.transformer.ln_f.register_forward_pre_hook(
        lambda m, a: rec.__setitem__("sf", inverse_scale(m, a[0]))))
    try:
        rec["logits"] = model.logits(idx[None])[0, -1].float()
    finally:
        for h in hooks:
            h.remove()
    return rec


def attention_pattern(attn, qkv):
    """softmax(q k^T / sqrt(d) + causal mask) per head, from c_attn's output (T, 3C): what the
    model's scaled_dot_product_attention computes its weights as."""
    T, C = qkv.size(0), attn.n_embd
    q, k, _ = (t.view(T, attn.n_head, C // attn.n_head).transpose(0, 1) for t in qkv.split(C, dim=1))
    scores = q @ k.transpose(1, 2) / math.sqrt(C // attn.n_head)
    causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def frozen_ln(ln, x, inv_scale):
    """LayerNorm with its 1/sigma fixed: linear in x."""
    y = (x - x.mean(-1, keepdim=True)) * inv_scale[:, None] * ln.weight
    return y + ln.bias if ln.bias is not None else y


def written(mlp, z):
    """What a block's MLP writes into the residual stream for activations z (T, d_ff): c_proj(z)
    with its bias; for a transcoder in the MLP's place, its decoder's W_dec z + b_pre."""
    return mlp.c_proj(z) + (mlp.coder.b_pre if hasattr(mlp, "coder") else 0)


def frozen_forward(model, rec, emb, sources, errors, tokens, follow=None):
    """Step 2: the residual stream from the source values through the frozen model. emb (T, C);
    sources[l] (T, d_ff): a node layer's activations, written by written(); errors[l] (T, C): an
    error vector per position, added as it is (a layer with neither writes its bias alone).
    follow: {layer: gains (T, d_ff)} for layers whose activations are not sources but follow
    their pre-activations linearly, gain x pre-activation (step 6: the recorded selection and GELU
    gain, gain(), with a node's set to 0 to remove it). Returns (pre-activations per block
    (T, d_ff), the last position's logits of `tokens`: only those, as the rest of lm_head's 50k
    rows would cost every backward pass a full unembedding)."""
    x, pre = emb, []
    for l, (block, r) in enumerate(zip(model.transformer.h, rec["blocks"])):
        attn, C = block.attn, emb.size(1)
        h = frozen_ln(block.ln_1, x, r["s1"])
        bias = attn.c_attn.bias[2 * C:] if attn.c_attn.bias is not None else None  # the values' rows
        v = F.linear(h, attn.c_attn.weight[2 * C:], bias).view(len(h), attn.n_head, -1).transpose(0, 1)
        y = (r["pattern"] @ v).transpose(0, 1).reshape(len(h), C)
        x = x + attn.c_proj(y)
        pre.append(block.mlp.c_fc(frozen_ln(block.ln_2, x, r["s2"])))
        z = pre[-1] * follow[l] if follow is not None and l in follow else sources.get(l, torch.zeros_like(pre[-1]))
        x = x + written(block.mlp, z) + errors.get(l, 0)
    return pre, F.linear(frozen_ln(model.transformer.ln_f, x[-1:], rec["sf"][-1:]), model.lm_head.weight[tokens])[0]


def gain(r):
    """activation / pre-activation of each neuron as recorded (0 where not kept or zero)."""
    pre, act = r["pre"], r["act"]
    return torch.where(pre != 0, act / pre.where(pre != 0, torch.ones_like(pre)), torch.zeros_like(pre))


def node_layers(model, dense_neurons=False):
    """(layers whose neurons are nodes, layers with one error node per position): the TopK blocks
    are node layers with no error, the dense ones error layers, unless dense_neurons makes every
    block's neurons nodes. A transcoder in a block's place is both: its latents are nodes, and
    what it misses of the MLP's output is the error."""
    blocks = model.transformer.h
    neurons = [l for l in range(len(blocks)) if dense_neurons or is_topk(model, l)]
    return neurons, [l for l in range(len(blocks)) if l not in neurons or hasattr(blocks[l].mlp, "coder")]


def logit_targets(logits, max_targets=10, cum_prob=0.95):
    """The default targets: the likeliest next tokens until their probability reaches cum_prob,
    at most max_targets. (token ids, their probabilities)."""
    p = logits.softmax(-1)
    top = p.topk(max_targets)
    n = int((top.values.cumsum(0) < cum_prob).sum()) + 1
    return top.indices[:n], top.values[:n]


def attribute(model, idx, targets=None, dense_neurons=False, max_targets=10, cum_prob=0.95, chunk=128):
    """Steps 1-3 on the prompt idx (T,): the graph as a dict. nodes: ('neuron', layer, pos, j),
    ('error', layer, pos, None), ('token', None, pos, token id), ('logit', None, T-1, token id)
    in circuit-tracer's order; adjacency (N, N), row = target, column = source; activation of each
    source node (a neuron's value; 1 for the others, whose vector is in the edge); value of each
    target (pre-activation or logit) and its bias terms; the logit targets' probabilities (the
    given targets, or logit_targets())."""
    if any(not getattr(block.mlp.act, "annealed", True) for l, block in enumerate(model.transformer.h) if is_topk(model, l)):
        raise ValueError("the model is not fully sparse (alpha > 0): trace a checkpoint after annealing ended")
    rec = record(model, idx)
    probs_all = rec["logits"].softmax(-1)
    if targets is None:
        target_ids, target_p = logit_targets(rec["logits"], max_targets, cum_prob)
    else:
        target_ids = torch.as_tensor(targets, dtype=torch.long, device=idx.device)
        target_p = probs_all[target_ids]
    neuron_layers, error_layers = node_layers(model, dense_neurons)
    T = len(idx)
    neurons = [(l, p, j) for l in neuron_layers for p, j in rec["blocks"][l]["act"].nonzero().tolist()]
    nodes = ([("neuron", l, p, j) for l, p, j in neurons]
             + [("error", l, p, None) for l in error_layers for p in range(T)]
             + [("token", None, p, t) for p, t in enumerate(idx.tolist())]
             + [("logit", None, T - 1, t) for t in target_ids.tolist()])

    # the sources as leaves of the frozen model
    wte, wpe = model.transformer.wte, model.transformer.wpe
    emb = (wte(idx) + wpe(torch.arange(T, device=idx.device))).detach().requires_grad_()
    sources = {l: rec["blocks"][l]["act"].detach().clone().requires_grad_() for l in neuron_layers}
    errors = {l: e.requires_grad_() for l, e in error_vectors(model, rec, error_layers, neuron_layers).items()}
    n_feat, n_err = len(neurons), len(error_layers) * T
    A = torch.zeros(len(nodes), len(nodes), device=idx.device, dtype=emb.dtype)
    with torch.enable_grad():
        pre, logits = frozen_forward(model, rec, emb, sources, errors, target_ids)
        # the targets a layer at a time (the logits last), each backward pass only through the blocks below it
        groups = [(l, pre[l][p, j]) for l, (p, j) in by_layer(neurons).items()] + [(len(rec["blocks"]), logits)]
        row = 0
        for l, values in groups:
            below = [(m, p, j) for m, p, j in neurons if m < l]  # a prefix: neurons are ordered by layer
            src, err = {m: sources[m] for m in sources if m < l}, {m: errors[m] for m in errors if m < l}
            row0 = row if l < len(rec["blocks"]) else len(nodes) - len(target_ids)
            for c0 in range(0, len(values), chunk):  # a batch of one-hot cotangents per backward pass
                n = min(chunk, len(values) - c0)
                cot = torch.zeros(n, len(values), device=values.device)
                cot[torch.arange(n), torch.arange(c0, c0 + n)] = 1
                grads = torch.autograd.grad(values, [emb, *src.values(), *err.values()], cot, retain_graph=True,
                                            is_grads_batched=True)
                from_neurons, from_errors, from_tokens = source_columns(grads, emb, src, err, below)
                rows = slice(row0 + c0, row0 + c0 + n)
                A[rows, :len(below)] = from_neurons
                A[rows, n_feat:n_feat + from_errors.size(1)] = from_errors  # errors too are ordered by layer
                A[rows, n_feat + n_err:n_feat + n_err + T] = from_tokens
            row += len(values)
        values = torch.cat([v for _, v in groups]).detach()
    with torch.no_grad():  # every source at zero: what the biases alone give each target
        bias = target_values(*frozen_forward(model, rec, torch.zeros_like(emb), {}, {}, target_ids), neurons)
    activation = torch.ones(len(nodes), device=idx.device, dtype=A.dtype)
    if neurons:
        activation[:n_feat] = torch.stack([rec["blocks"][l]["act"][p, j] for l, p, j in neurons])
    return dict(nodes=nodes, adjacency=A, activation=activation, values=values, bias=bias,
                logit_ids=target_ids, logit_probabilities=target_p, n_neurons=n_feat, n_errors=n_err, n_tokens=T,
                record=rec, neuron_layers=neuron_layers, error_layers=error_layers)


@torch.no_grad()
def error_vectors(model, rec, layers, node_layers):
    """{layer: (T, C)}, the error nodes' vectors: the MLP's output less what written() gives for
    the layer's node activations (none in a dense block: its bias alone, a bias term)."""
    out = {}
    for l in layers:
        act = rec["blocks"][l]["act"]
        out[l] = rec["blocks"][l]["mlp_out"] - written(model.transformer.h[l].mlp, act if l in node_layers else 0 * act)
    return out


def by_layer(neurons):
    """{layer: (positions, indices)} of (layer, position, index) triples ordered by layer."""
    out = {}
    for l, p, j in neurons:
        out.setdefault(l, ([], []))
        out[l][0].append(p)
        out[l][1].append(j)
    return {l: (torch.tensor(p), torch.tensor(j)) for l, (p, j) in out.items()}


def target_values(pre, logits, neurons):
    """The targets' values in node order: the neurons' pre-activations, then the logits."""
    return torch.cat([pre[l][p, j] for l, (p, j) in by_layer(neurons).items()] + [logits])


def source_columns(grads, emb, sources, errors, neurons):
    """Edges into a chunk of targets from the sources below them, from the targets' gradients with
    respect to the leaves (emb, sources', errors' in order), as (from neurons, from error nodes,
    from tokens): a neuron's is its activation times its gradient; an error node's and a token's,
    the dot product of its vector with its gradient."""
    g_emb = grads[0]
    g_src = dict(zip(sources, grads[1:1 + len(sources)]))
    g_err = dict(zip(errors, grads[1 + len(sources):]))
    empty = g_emb.new_zeros(len(g_emb), 0)
    from_neurons = [g_src[l][:, p, j] * sources[l].detach()[p, j] for l, (p, j) in by_layer(neurons).items()]
    from_errors = [(g_err[l] * e.detach()).sum(-1) for l, e in errors.items()]
    return torch.cat([empty] + from_neurons, 1), torch.cat([empty] + from_errors, 1), (g_emb * emb.detach()).sum(-1)


@torch.no_grad()
def predicted_effects(model, graph, node_ids, target=0):
    """Step 6, the graph's side: per neuron node, the change of the target logit (index into the
    logit targets) when that neuron is zeroed in the frozen model, every later neuron following
    its pre-activation with the recorded selection and GELU gain, dense blocks' outputs held."""
    rec, neuron_layers, error_layers = graph["record"], graph["neuron_layers"], graph["error_layers"]
    idx = torch.tensor([n[3] for n in graph["nodes"] if n[0] == "token"], device=graph["adjacency"].device)
    emb = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(len(idx), device=idx.device))
    held = error_vectors(model, rec, error_layers, neuron_layers)
    token = graph["logit_ids"][target:target + 1]
    base = frozen_forward(model, rec, emb, {}, held, token, {l: gain(rec["blocks"][l]) for l in neuron_layers})[1][0]
    out = []
    for i in node_ids:
        _, l, p, j = graph["nodes"][i]
        gains = {m: gain(rec["blocks"][m]) for m in neuron_layers}
        gains[l][p, j] = 0
        out.append((frozen_forward(model, rec, emb, {}, held, token, gains)[1][0] - base).item())
    return out


@torch.no_grad()
def measured_effects(model, graph, node_ids, target=0):
    """Step 6, the real model's side: per neuron node, the change of the target logit when that
    neuron is zeroed at its position in the real model (every later TopK selection free), all
    nodes at once, one row of a batch each."""
    idx = torch.tensor([n[3] for n in graph["nodes"] if n[0] == "token"], device=graph["adjacency"].device)
    rows = [graph["nodes"][i][1:] for i in node_ids]
    hooks = []
    for layer in {l for l, _, _ in rows}:
        which = [(r, p, j) for r, (l, p, j) in enumerate(rows) if l == layer]
        r_, p_, j_ = (torch.tensor(v, device=idx.device) for v in zip(*which))

        def zero(module, inp, out, r_=r_, p_=p_, j_=j_):
            out = out.clone()
            out[r_, p_, j_] = 0
            return out
        hooks.append(model.transformer.h[layer].mlp.act.register_forward_hook(zero))
    try:
        logits = model.logits(idx.expand(len(rows), -1))[:, -1, graph["logit_ids"][target]]
    finally:
        for h in hooks:
            h.remove()
    return (logits - graph["record"]["logits"][graph["logit_ids"][target]]).tolist()


def node_name(node):
    kind, l, p, x = node
    return {"neuron": f"neuron {l}:{x} @ {p}", "error": f"error {l} @ {p}", "token": f"token {decode([x])!r} @ {p}",
            "logit": f"logit {decode([x])!r}"}[kind]


def check(model, graph, node_influence, keep, n=20):
    """Step 6 on the pruned graph's n most influential neurons: (their indices, predicted and
    measured changes of the top logit, their Pearson correlation; nan with fewer than 3)."""
    order = [i for i in node_influence.argsort(descending=True).tolist() if i < graph["n_neurons"] and keep[i]][:n]
    if not order:
        return order, [], [], float("nan")
    predicted, measured = predicted_effects(model, graph, order), measured_effects(model, graph, order)
    r = float(np.corrcoef(predicted, measured)[0, 1]) if len(order) >= 3 else float("nan")
    return order, predicted, measured, r


def main():
    configure(globals())
    at_least(0, check_nodes=check_nodes, eval_tokens=eval_tokens)
    if not os.path.exists(os.path.join(out_dir, 'ckpt.pt') if os.path.isdir(out_dir) else out_dir):
        die(f"no checkpoint in --out_dir={out_dir} (train one with train.py)")
    if not (0 < node_threshold <= 1 and 0 < edge_threshold <= 1):
        die(f"--node_threshold and --edge_threshold must be in (0, 1], got {node_threshold} and {edge_threshold}")
    model, ckpt = load_model(out_dir, 'cpu')
    if transcoders:
        attach_transcoders(model, transcoders)
    alpha = trained_alpha(ckpt)
    if alpha > 0:
        die(f"{out_dir} was saved at iteration {ckpt['iter_num']}, alpha {alpha:.3f}: its neurons are not yet sparse; "
            "trace a checkpoint from after annealing ended")
    if not dense_neurons and not any(is_topk(model, l) for l in range(len(model.transformer.h))):
        die(f"{out_dir} is a dense model (topk = 0): it has no TopK neurons; give --dense_neurons=True to trace its "
            "neurons, or --transcoders=FOLDER to trace transcoders' latents")
    ids = encode_prompt(prompt, '--prompt')
    if len(ids) > model.config.block_size:
        die(f"--prompt is {len(ids)} tokens with <|endoftext|>; the context holds {model.config.block_size}")
    targets = None
    if target:
        t = encode(target)
        if len(t) != 1:
            die(f"--target={target!r} is {len(t)} GPT-2 tokens; give one token (a leading space counts)")
        targets = t
    tokens = run_eval_tokens(eval_data, ckpt, eval_tokens, model.config.block_size) if eval_tokens else None
    graph = attribute(model, torch.tensor(ids), targets, dense_neurons)
    keep, edges, node_influence = prune(graph, node_threshold, edge_threshold)
    replacement, completeness = scores(graph, node_influence)
    order, predicted, measured, r = check(model, graph, node_influence, keep, check_nodes)
    nodes = graph["nodes"]
    print(f"prompt: {prompt!r} ({len(ids)} tokens with <|endoftext|>)")
    print("targets: " + ", ".join(f"{decode([t])!r} {p:.3f}" for t, p in
                                  zip(graph["logit_ids"].tolist(), graph["logit_probabilities"].tolist())))
    n, e = graph['n_neurons'], graph['n_errors']
    print(f"nodes: {n} neurons, {e} error nodes, {graph['n_tokens']} tokens; kept {int(keep[:n].sum())} neurons, "
          f"{int(keep[n:n + e].sum())} error nodes; edges {int((graph['adjacency'] != 0).sum())}, "
          f"kept {int(edges.sum())}")
    print(f"replacement score {replacement:.3f}, completeness score {completeness:.3f}")
    print(f"the top logit's change when a neuron is zeroed, graph against real model, over the {len(order)} most "
          f"influential kept neurons: Pearson r {r:.3f}")
    for i, p, m in zip(order, predicted, measured):
        print(f"  {node_name(nodes[i])}: influence {node_influence[i]:.4f}, predicted {p:+.4f}, measured {m:+.4f}")
    neurons = {i: nodes[i] for i in keep.nonzero()[:, 0].tolist() if nodes[i][0] == "neuron"}
    clerps, contexts = neuron_notes(model, neurons, tokens)
    extra = dict(replacement_score=replacement, completeness_score=completeness, check_r=r,
                 check=[dict(node=f"{nodes[i][1]}_{nodes[i][3]}_{nodes[i][2]}", predicted=p, measured=m)
                        for i, p, m in zip(order, predicted, measured)])
    slug = "".join(c if c.isalnum() else "_" for c in prompt.strip().lower())[:40].strip("_")
    slug += "_transcoders" if transcoders else "_neurons" if dense_neurons else ""  # the routes side by side
    model_json = graph_json(graph, keep, edges, node_influence, prompt, slug, len(model.transformer.h), clerps, extra)
    folder = os.path.join(run_folder(out_dir), 'analysis')
    files = {f'graph_{slug}.json': json.dumps(model_json), f'graph_{slug}.html': page(model_json, contexts)}
    for name, text in files.items():
        atomic_write(os.path.join(folder, name), lambda f, text=text: f.write(text.encode()))
        print(f"wrote {os.path.join(folder, name)}")

if __name__ == '__main__':
    main()
