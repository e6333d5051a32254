"""
An attribution graph of trace.py as files: circuit-tracer's graph JSON (the schema its viewer and
Neuronpedia's read: metadata, qParams, nodes, links), and a self-contained page of it, layers by
prompt positions, edges drawn by weight, each neuron's top contexts shown on a click.

Node ids follow circuit-tracer: a neuron (its "feature") is LAYER_INDEX_POS, an error node
0_LAYER_POS, a token E_TOKEN_POS, a logit (n_layer + 1)_TOKEN_POS. A node's influence there is
its cumulative share: the share of total influence held by the nodes at least as influential.
"""
import html
import json

import torch

from toolkit.data import decode
from toolkit.neurons import collect, contexts_text, promoted_tokens

SCHEMA = 1  # circuit-tracer's metadata.schema_version


def graph_json(graph, keep, edges, node_influence, prompt, slug, n_layer, clerps=None, extra=None):
    """circuit-tracer's graph file as a dict, for the kept nodes and edges of a trace.attribute()
    graph. clerps: {node index: a label} (for a neuron, what it is known for); extra: more
    metadata (this project's scores and check), which circuit-tracer's readers ignore."""
    order = node_influence.argsort(descending=True)
    cumulative = torch.empty_like(node_influence)
    cumulative[order] = node_influence[order].cumsum(0) / node_influence.sum().clamp(min=1e-30)
    probs = dict(zip(graph["logit_ids"].tolist(), graph["logit_probabilities"].tolist()))
    nodes, ids = [], {}
    for i in keep.nonzero()[:, 0].tolist():
        kind, l, p, x = graph["nodes"][i]
        influence = cumulative[i].item()
        if kind == "neuron":
            node = dict(node_id=f"{l}_{x}_{p}", feature=(l + x) * (l + x + 1) // 2 + x, layer=str(l), ctx_idx=p,
                        feature_type="cross layer transcoder", jsNodeId=f"{l}_{x}-0", influence=influence,
                        activation=graph["activation"][i].item())
        elif kind == "error":
            node = dict(node_id=f"0_{l}_{p}", feature=-1, layer=str(l), ctx_idx=p,
                        feature_type="mlp reconstruction error", jsNodeId=f"{l}_{p}-0", influence=influence)
        elif kind == "token":
            node = dict(node_id=f"E_{x}_{p}", feature=p, layer="E", ctx_idx=p, feature_type="embedding",
                        jsNodeId=f"E_{x}-{p}", influence=influence)
        else:
            node = dict(node_id=f"{n_layer + 1}_{x}_{p}", feature=x, layer=str(n_layer + 1), ctx_idx=p,
                        feature_type="logit", token_prob=probs[x], is_target_logit=x == graph["logit_ids"][0].item(),
                        jsNodeId=f"L_{x}-{p}", clerp=f'Output "{decode([x])}" (p={probs[x]:.3f})')
        node.setdefault("clerp", (clerps or {}).get(i, ""))
        nodes.append(dict(dict(token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0, influence=None,
                               activation=None), **node))  # every field of circuit-tracer's Node
        ids[i] = node["node_id"]
    links = [dict(source=ids[s], target=ids[t], weight=graph["adjacency"][t, s].item())
             for t, s in edges.nonzero().tolist() if s in ids and t in ids]
    tokens = [n[3] for n in graph["nodes"] if n[0] == "token"]
    metadata = dict(slug=slug, scan="topk-lm", transcoder_list=[], prompt_tokens=[decode([t]) for t in tokens],
                    prompt=prompt, node_threshold=None, schema_version=SCHEMA, **(extra or {}))
    return dict(metadata=metadata, qParams=dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
                nodes=nodes, links=links)


def neuron_notes(model, neurons, tokens=None):
    """What the page says of each neuron node ({index: (kind, layer, position, j)}): ({index: the
    tokens it promotes}, {node id: its top contexts in tokens (none without tokens)})."""
    clerps = {i: "promotes " + " ".join(repr(decode([t])) for t in promoted_tokens(model, l, j, 5))
              for i, (_, l, _, j) in neurons.items()}
    if tokens is None or not neurons:
        return clerps, {}
    stats = collect(model, tokens, sorted({l for _, l, _, _ in neurons.values()}), top_m=8)
    return clerps, {f"{l}_{j}_{p}": contexts_text(tokens, stats[l], j, n=8) for _, l, p, j in neurons.values()}


def page(model_json, contexts=None):
    """The graph as one HTML page: columns are the prompt's positions, rows the embeddings, the
    layers and the logits; edges drawn with width by |weight| (blue raises, red lowers); a click
    on a node lists its strongest edges and, for a neuron, its top contexts ({node_id: [lines]})."""
    data = json.dumps(dict(graph=model_json, contexts=contexts or {})).replace("</", "<\\/")
    title = html.escape(model_json["metadata"]["prompt"])
    return PAGE.replace("__TITLE__", title).replace("__DATA__", data)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Attribution graph: __TITLE__</title>
<style>
body { font-family: sans-serif; margin: 1em; }
#wrap { display: flex; gap: 1em; }
svg { border: 1px solid #ccc; background: #fff; }
#side { width: 28em; font-size: 13px; }
.node { cursor: pointer; }
pre { white-space: pre-wrap; font-size: 12px; }
</style></head><body>
<h3>Attribution graph: __TITLE__</h3>
<p id="summary"></p>
<div id="wrap"><svg id="graph"></svg><div id="side"><p>Click a node.</p></div></div>
<script>
const DATA = __DATA__;
const g = DATA.graph, nodes = g.nodes, links = g.links;
const tokens = g.metadata.prompt_tokens;
const rowOf = n => n.layer === 'E' ? 0 : n.feature_type === 'logit' ? +n.layer : +n.layer + 1;  // logits: n_layer + 1
const nRows = nodes.reduce((m, n) => Math.max(m, rowOf(n)), 0) + 1, colW = 110, rowH = 70;
const cells = {};
nodes.forEach(n => { const k = rowOf(n) + ',' + n.ctx_idx; (cells[k] = cells[k] || []).push(n); });
Object.values(cells).forEach(list => list.forEach((n, i) => {
  n.x = 80 + n.ctx_idx * colW + (i + 1) * colW / (list.length + 1);
  n.y = 30 + (nRows - 1 - rowOf(n)) * rowH;
}));
const byId = Object.fromEntries(nodes.map(n => [n.node_id, n]));
const svg = document.getElementById('graph'), NS = 'http://www.w3.org/2000/svg';
svg.setAttribute('width', 120 + tokens.length * colW); svg.setAttribute('height', 60 + nRows * rowH);
const maxW = links.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 1e-9);  // no spread: a dense graph has 10^5 links
links.forEach(l => {
  const s = byId[l.source], t = byId[l.target], e = document.createElementNS(NS, 'line');
  e.setAttribute('x1', s.x); e.setAttribute('y1', s.y); e.setAttribute('x2', t.x); e.setAttribute('y2', t.y);
  e.setAttribute('stroke', l.weight > 0 ? '#3366cc' : '#cc3333');
  e.setAttribute('stroke-width', 0.3 + 4 * Math.abs(l.weight) / maxW); e.setAttribute('stroke-opacity', 0.5);
  e.setAttribute('class', 'link'); svg.appendChild(e);
});
function text(x, y, s, anchor) { const e = document.createElementNS(NS, 'text');
  e.setAttribute('x', x); e.setAttribute('y', y); e.setAttribute('font-size', 11); e.setAttribute('text-anchor', anchor);
  e.textContent = s; svg.appendChild(e); }
tokens.forEach((t, p) => text(80 + p * colW + colW / 2, 50 + nRows * rowH - 10, JSON.stringify(t), 'middle'));
for (let r = 0; r < nRows; r++)
  text(70, 34 + (nRows - 1 - r) * rowH, r === 0 ? 'tokens' : r === nRows - 1 ? 'logits' : 'block ' + (r - 1), 'end');
const color = {'cross layer transcoder': '#6a9', 'mlp reconstruction error': '#999', 'embedding': '#caa', 'logit': '#fb5'};
nodes.forEach(n => { const c = document.createElementNS(NS, 'circle');
  c.setAttribute('cx', n.x); c.setAttribute('cy', n.y); c.setAttribute('r', 6); c.setAttribute('fill', color[n.feature_type]);
  c.setAttribute('class', 'node'); c.setAttribute('id', 'n-' + n.node_id);
  const tip = document.createElementNS(NS, 'title'); tip.textContent = label(n); c.appendChild(tip);
  c.addEventListener('click', () => show(n)); svg.appendChild(c); });
function label(n) {
  if (n.feature_type === 'cross layer transcoder') { const [l, j] = n.node_id.split('_'); return `neuron ${l}:${j} at ${n.ctx_idx}`; }
  if (n.feature_type === 'mlp reconstruction error') return `error, block ${n.layer} at ${n.ctx_idx}`;
  if (n.feature_type === 'embedding') return `token ${JSON.stringify(tokens[n.ctx_idx])} at ${n.ctx_idx}`;
  return n.clerp;
}
function esc(s) { return String(s).replace(/[&<>]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;'}[c])); }
function show(n) {
  const into = links.filter(l => l.target === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
  const out = links.filter(l => l.source === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
  const row = (l, id) => `<li>${esc(label(byId[id]))}: ${l.weight.toFixed(3)}</li>`;
  const ctx = DATA.contexts[n.node_id];
  document.getElementById('side').innerHTML = `<h4 id="picked">${esc(label(n))}</h4>` +
    (n.activation !== undefined && n.activation !== null ? `<p>activation ${n.activation.toFixed(3)}</p>` : '') +
    `<p>cumulative influence ${n.influence === null || n.influence === undefined ? '-' : n.influence.toFixed(3)}</p>` +
    (n.clerp ? `<p>${esc(n.clerp)}</p>` : '') +
    `<p>from</p><ul>${into.map(l => row(l, l.source)).join('')}</ul><p>to</p><ul>${out.map(l => row(l, l.target)).join('')}</ul>` +
    (ctx ? `<p>top contexts</p><pre id="contexts">${esc(ctx.join('\\n'))}</pre>` : '');
}
const m = g.metadata;
document.getElementById('summary').textContent = `${nodes.length} nodes, ${links.length} edges` +
  (m.replacement_score !== undefined ? `; replacement score ${m.replacement_score.toFixed(3)}, completeness ${m.completeness_score.toFixed(3)}` : '');
</script></body></html>
"""
