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
    return a.div_(row_l1(a)[:, None].clamp(min=1e-10))  # in place: a dense graph's A is gigabytes


def row_l1(A):
    """Per row, the sum of |A|, with no |A| in memory."""
    return torch.linalg.vector_norm(A, 1, dim=1)


def influence(A_hat, weights):
    """Per node, its influence on the weighted targets over paths of every length:
    weights (A_hat + A_hat^2 + ...). The nodes are in causal order and sources have no inputs, so
    the series ends (A_hat is nilpotent) after at most as many terms as the graph is deep."""
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
    kept = keep.nonzero()[:, 0]  # the edge step works on the kept nodes alone (a dense graph has many)
    A_hat, w_kept = normalized(A[kept][:, kept]), w[kept]
    edge_scores = A_hat * (influence(A_hat, w_kept) + w_kept)[:, None]
    edges = (edge_scores >= cumulative_cut(edge_scores, edge_threshold)) & (edge_scores > 0)
    alive = torch.ones(len(kept), dtype=torch.bool, device=A.device)
    prunable, neuron = kept < n_src, kept < graph["n_neurons"]
    while True:
        before = alive.clone()
        edges &= alive[:, None] & alive[None, :]
        alive &= ~prunable | edges.any(0)  # a neuron or error node that feeds nothing
        alive &= ~neuron | edges.any(1)  # a neuron that nothing feeds
        if torch.equal(alive, before):
            break
    keep[kept] = alive
    full = torch.zeros(len(A), len(A), dtype=torch.bool, device=A.device)
    full[kept[:, None], kept[None, :]] = edges & alive[:, None] & alive[None, :]
    return keep, full, node_influence


def scores(graph, node_influence=None):
    """Step 5: (replacement score, completeness score) as circuit-tracer defines them.
    node_influence: prune()'s, when it has been computed (a dense graph's takes a while)."""
    A, w = graph["adjacency"], logit_weights(graph)
    if node_influence is None:
        node_influence = influence(normalized(A), w)
    e0, e1 = graph["n_neurons"], graph["n_neurons"] + graph["n_errors"]
    token_influence, error_influence = node_influence[e1:e1 + graph["n_tokens"]].sum(), node_influence[e0:e1].sum()
    replacement = token_influence / (token_influence + error_influence)
    from_readable = 1 - row_l1(A[:, e0:e1]) / row_l1(A).clamp(min=1e-10)
    weight = node_influence + w
    return replacement.item(), ((from_readable * weight).sum() / weight.sum()).item()
