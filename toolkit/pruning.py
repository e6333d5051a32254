"""
Steps 4 and 5 of trace.py on an attribution graph (its dict: nodes in circuit-tracer's order,
adjacency with row = target and column = source, the logit targets' probabilities): influence on
the logits over paths, pruning to the nodes and edges that carry it, and circuit-tracer's
replacement and completeness scores.
"""
import torch


def logit_weights(graph):
    """Per node: its logit target's share of the targets' probability (0 for every other node).
    Shares, not probabilities: influence is relative, and a target asked for by name may be one
    the model gives almost no probability (equal shares if it gives none at all)."""
    w = torch.zeros(len(graph["nodes"]), device=graph["adjacency"].device, dtype=graph["adjacency"].dtype)
    p = graph["logit_probabilities"].to(w.dtype)
    w[-len(p):] = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / len(p))
    return w


def normalized(A):
    """|A| with each row scaled to sum to 1: the share of a target's input from each source."""
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(A_hat, weights):
    """Per node, its influence on the weighted targets over paths of every length:
    weights (A + A^2 + ...). The nodes are in causal order and sources have no inputs, so
    the series ends (A is nilpotent) after at most as many terms as the graph is deep."""
    step, total = weights @ A_hat, torch.zeros_like(weights)
    for _ in range(len(weights)):
        if not step.any():
            return total
        total, step = total + step, step @ A_hat
    raise RuntimeError("the graph has a cycle: influence does not converge")


def cumulative_cut(scores, share):
    """The smallest score among the top scores that together reach `share` of the total."""
    ranked = scores.flatten().sort(descending=True).values
    cumulative = ranked.cumsum(0) / ranked.sum().clamp(min=1e-30)
    return ranked[min(int(torch.searchsorted(cumulative, torch.tensor(share, device=ranked.device))), len(ranked) - 1)]


def prune(graph, node_threshold=0.8, edge_threshold=0.98):
    """Step 4: (node mask, edge mask, node influence). Neurons and error nodes are kept by
    influence up to node_threshold of the total, tokens and logits always; then edges among the
    kept nodes by their share of influence (normalised weight x the target's influence, logits
    counting their probability) up to edge_threshold; then, until nothing changes, a neuron or
    error node left with no outgoing edge is dropped, and a neuron with no incoming one."""
    A, w = graph["adjacency"], logit_weights(graph)
    node_influence = influence(normalized(A), w)
    n_src = graph["n_neurons"] + graph["n_errors"]  # neurons and errors: the prunable nodes
    keep = node_influence >= cumulative_cut(node_influence, node_threshold)
    keep[n_src:] = True
    pruned = A * keep[:, None] * keep[None, :]
    A_hat = normalized(pruned)
    edge_scores = A_hat * (influence(A_hat, w) + w)[:, None]
    edges = (edge_scores >= cumulative_cut(edge_scores, edge_threshold)) & (edge_scores > 0)
    while True:
        before = keep.clone()
        edges &= keep[:, None] & keep[None, :]
        keep[:n_src] &= edges[:, :n_src].any(0)
        keep[:graph["n_neurons"]] &= edges[:graph["n_neurons"]].any(1)
        if torch.equal(keep, before):
            return keep, edges & keep[:, None] & keep[None, :], node_influence


def scores(graph):
    """Step 5: (replacement score, completeness score) as circuit-tracer defines them."""
    A_hat, w = normalized(graph["adjacency"]), logit_weights(graph)
    node_influence = influence(A_hat, w)
    e0, e1 = graph["n_neurons"], graph["n_neurons"] + graph["n_errors"]
    token_influence, error_influence = node_influence[e1:e1 + graph["n_tokens"]].sum(), node_influence[e0:e1].sum()
    replacement = token_influence / (token_influence + error_influence)
    from_readable = 1 - A_hat[:, e0:e1].sum(1)
    weight = node_influence + w
    return replacement.item(), ((from_readable * weight).sum() / weight.sum()).item()
