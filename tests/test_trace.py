"""trace.py: attribution graphs with the model's own neurons as nodes. The frozen model is exact
(edges are its finite differences and add up to each target), a planted circuit is found, pruning
and the scores follow their definitions, and the script takes bad input in one line."""
import json
import re
import shutil

import pytest
import torch

from conftest import TRACE_PROMPT as PROMPT, planted_circuit, save_transcoders, transcoders_for
from toolkit import dictionary, pruning, trace
from toolkit.common import load_model
from toolkit.data import encode



def test_a_targets_incoming_edges_and_its_bias_terms_add_up_to_it(tiny_model):
    model = tiny_model()
    graph = trace.attribute(model, PROMPT)
    n, A = graph['n_neurons'], graph['adjacency']
    targets = torch.cat([torch.arange(n), torch.arange(len(A) - len(graph['logit_ids']), len(A))])
    assert torch.allclose(A[targets].sum(1) + graph['bias'], graph['values'], atol=1e-5)
    # and the frozen model's values are the real model's: its logits and pre-activations
    assert torch.allclose(graph['values'][n:], model.logits(PROMPT[None])[0, -1, graph['logit_ids']], atol=1e-5)
    pre = torch.stack([graph['record']['blocks'][l]['pre'][p, j] for _, l, p, j in graph['nodes'][:n]])
    assert torch.allclose(graph['values'][:n], pre, atol=1e-5)


def test_edges_are_finite_differences_of_the_frozen_model(tiny_model):
    """Scaling a source by 1 + eps (a neuron's activation, a token's embedding, an error vector)
    moves each target by eps x the edge, in float64."""
    model = tiny_model().double()
    graph = trace.attribute(model, PROMPT)
    rec, nodes, A = graph['record'], graph['nodes'], graph['adjacency']
    idx = PROMPT
    emb = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(len(idx)))
    base_sources = {l: rec['blocks'][l]['act'] for l in graph['neuron_layers']}
    base_errors = {l: rec['blocks'][l]['mlp_out'] - model.transformer.h[l].mlp.c_proj.bias for l in graph['error_layers']}

    def target_values(e, sources, errors):
        pre, logits = trace.frozen_forward(model, rec, e, sources, errors, graph['logit_ids'])
        return torch.cat([torch.stack([pre[l][p, j] for _, l, p, j in nodes[:graph['n_neurons']]]), logits])
    base, eps = target_values(emb, base_sources, base_errors), 1e-6
    rows = list(range(graph['n_neurons'])) + list(range(len(A) - len(graph['logit_ids']), len(A)))
    picked = [0, graph['n_neurons'] // 2, graph['n_neurons'] - 1,  # neurons of layers 0 and 1
              graph['n_neurons'] + graph['n_errors'] - 1,  # the dense block's error node at the last position
              graph['n_neurons'] + graph['n_errors'] + 2]  # a token
    for s in picked:
        kind, l, p, j = nodes[s]
        e, sources, errors = emb.clone(), {m: v.clone() for m, v in base_sources.items()}, dict(base_errors)
        if kind == 'neuron':
            sources[l][p, j] *= 1 + eps
        elif kind == 'error':
            errors[l] = errors[l].clone()
            errors[l][p] *= 1 + eps
        else:
            e[p] *= 1 + eps
        moved = (target_values(e, sources, errors) - base) / eps
        assert torch.allclose(moved, A[rows, s], rtol=1e-4, atol=1e-7)
        assert A[rows, s].abs().max() > 0


def test_a_planted_circuit_is_the_top_node(tiny_model):
    model = tiny_model()
    X = planted_circuit(model)
    graph = trace.attribute(model, PROMPT)
    assert graph['logit_ids'][0] == X  # the planted neuron makes ' salary' the likeliest token
    _, _, node_influence = pruning.prune(graph)
    top = graph['nodes'][int(node_influence[:graph['n_neurons']].argmax())]
    assert top == ('neuron', 1, len(PROMPT) - 1, 5)  # at the last position, where the logit is read
    order, predicted, measured, r = trace.check(model, graph, node_influence, torch.ones(len(graph['nodes']), dtype=bool))
    assert order[0] == graph['nodes'].index(top) and predicted[0] < 0 and measured[0] < 0  # zeroing it lowers the logit


def toy_graph():
    """By hand: token t feeds neurons a (strongly), b (weakly) and c; a and b feed the one logit,
    c feeds nothing. Nodes in circuit-tracer's order: a, b, c, token, logit."""
    A = torch.zeros(5, 5)
    A[0, 3], A[1, 3], A[2, 3] = 3.0, 1.0, 1.0  # t -> a, b, c
    A[4, 0], A[4, 1], A[4, 3] = 6.0, 1.0, 3.0  # a, b and t -> logit
    nodes = [('neuron', 0, 0, 0), ('neuron', 0, 0, 1), ('neuron', 0, 0, 2), ('token', None, 0, 7), ('logit', None, 0, 9)]
    return dict(nodes=nodes, adjacency=A, n_neurons=3, n_errors=0, n_tokens=1, logit_ids=torch.tensor([9]),
                logit_probabilities=torch.tensor([1.0]))


def test_influence_is_the_sum_over_paths_of_normalised_weights():
    graph = toy_graph()
    _, _, node_influence = pruning.prune(graph)
    # logit's inputs: a 0.6, b 0.1, t 0.3; a's and b's only input is t
    assert node_influence.tolist() == pytest.approx([0.6, 0.1, 0.0, 0.3 + 0.6 + 0.1, 0.0])


def test_pruning_keeps_nodes_and_edges_up_to_their_thresholds():
    graph = toy_graph()
    keep, edges, _ = pruning.prune(graph, node_threshold=0.5, edge_threshold=0.98)
    assert keep.tolist() == [False, False, False, True, True]  # t alone holds 1.0 of 1.7, more than half
    keep, edges, _ = pruning.prune(graph, node_threshold=0.9, edge_threshold=0.98)
    assert keep.tolist() == [True, False, False, True, True]  # t and a (0.6) hold 0.94 of it
    assert edges.nonzero().tolist() == [[0, 3], [4, 0], [4, 3]]
    keep, edges, _ = pruning.prune(graph, node_threshold=1.0, edge_threshold=1.0)
    assert keep.tolist() == [True, True, False, True, True]  # c has no influence: never kept
    keep, edges, _ = pruning.prune(graph, node_threshold=1.0, edge_threshold=0.7)  # t -> b is the weakest edge
    assert not edges[1, 3] and not keep[1]  # b loses its only input, so it goes too


def test_the_scores_count_what_flows_through_error_nodes():
    assert pruning.scores(toy_graph()) == pytest.approx((1.0, 1.0))  # no error node
    # token t feeds neuron a; a, an error node e and t feed the logit (nodes: a, e, t, logit)
    A = torch.zeros(4, 4)
    A[0, 2] = 1.0
    A[3, 0], A[3, 1], A[3, 2] = 6.0, 1.0, 3.0
    graph = dict(nodes=[('neuron', 0, 0, 0), ('error', 1, 0, None), ('token', None, 0, 7), ('logit', None, 0, 9)],
                 adjacency=A, n_neurons=1, n_errors=1, n_tokens=1, logit_ids=torch.tensor([9]),
                 logit_probabilities=torch.tensor([1.0]))
    replacement, completeness = pruning.scores(graph)
    assert replacement == pytest.approx(0.9 / (0.9 + 0.1))  # influence: t 0.3 + 0.6 through a; e 0.1
    # only the logit draws on e (0.1 of its input); weights: influence, and the logit's probability
    assert completeness == pytest.approx(1 - 0.1 / (0.6 + 0.1 + 0.9 + 1.0))


def test_the_dense_tail_is_error_nodes_unless_its_neurons_are_asked_for(tiny_model):
    model = tiny_model()
    graph = trace.attribute(model, PROMPT)
    assert graph['n_errors'] == len(PROMPT) and pruning.scores(graph)[0] < 1  # block 2 is dense
    full = trace.attribute(model, PROMPT, dense_neurons=True)
    assert full['n_errors'] == 0 and pruning.scores(full) == pytest.approx((1.0, 1.0))
    assert full['n_neurons'] == graph['n_neurons'] + int((graph['record']['blocks'][2]['act'] != 0).sum())


def test_the_script_writes_the_pruned_graph_in_circuit_tracers_format(tiny_runs, tmp_path, run_main):
    run = tmp_path / 'topk'
    shutil.copytree(tiny_runs / 'topk', run)
    printed = run_main('toolkit.trace', f'--out_dir={run}', '--prompt=Anna saw the job', '--target= office',
                       '--node_threshold=1.0')
    assert "targets: ' office'" in printed and 'replacement score' in printed and 'Pearson r' in printed
    graph = json.loads((run / 'analysis' / 'graph_anna_saw_the_job.json').read_text())
    assert set(graph) == {'metadata', 'qParams', 'nodes', 'links'}
    assert graph['metadata']['prompt_tokens'] == ['<|endoftext|>', 'Anna', ' saw', ' the', ' job']
    ids = {n['node_id'] for n in graph['nodes']}
    assert all(link['source'] in ids and link['target'] in ids for link in graph['links'])
    kinds = {n['feature_type'] for n in graph['nodes']}
    assert {'embedding', 'logit', 'cross layer transcoder'} <= kinds
    logit, = [n for n in graph['nodes'] if n['feature_type'] == 'logit']
    assert logit['feature'] == encode(' office')[0] and logit['is_target_logit'] and logit['layer'] == '4'
    assert (run / 'analysis' / 'graph_anna_saw_the_job.html').stat().st_size > 0


@pytest.mark.parametrize("flags, message", [
    (['--prompt= '], "--prompt is empty"),
    (['--prompt=' + 'job ' * 40], "the context holds 32"),
    (['--target= salary office'], "give one token"),
    (['--out_dir={runs}/dense'], "is a dense model (topk = 0)"),
    (['--out_dir={runs}/topk/ckpt_000000.pt'], "its neurons are not yet sparse"),
    (['--out_dir={runs}/dense', '--transcoders={runs}'], "holds no transcoder_layerL.pt"),
])
def test_bad_input_is_one_line(tiny_runs, run_main, flags, message):
    flags = [f.format(runs=tiny_runs) for f in flags]
    if not any(f.startswith('--out_dir') for f in flags):
        flags.append(f'--out_dir={tiny_runs / "topk"}')
    with pytest.raises(SystemExit, match=message.replace('(', r'\(').replace(')', r'\)')):
        run_main('toolkit.trace', *flags)


def test_a_transcoders_latents_are_nodes_and_what_it_misses_is_an_error_node(tiny_model):
    model = tiny_model(topk=0)
    with torch.no_grad():
        logits = model.logits(PROMPT[None])[0, -1]
    with dictionary.attached(model, transcoders_for(model, [0, 1])):
        graph = trace.attribute(model, PROMPT)
    n, T = graph['n_neurons'], len(PROMPT)
    assert {l for _, l, _, _ in graph['nodes'][:n]} == {0, 1} and n <= 2 * 4 * T  # k = 4 latents per token
    assert graph['n_errors'] == 3 * T  # two transcoders' misses and the dense block 2
    A = graph['adjacency']
    targets = torch.cat([torch.arange(n), torch.arange(len(A) - len(graph['logit_ids']), len(A))])
    assert torch.allclose(A[targets].sum(1) + graph['bias'], graph['values'], atol=1e-5)
    assert torch.allclose(graph['values'][n:], logits[graph['logit_ids']], atol=1e-5)  # observe mode: the dense model
    assert 0 < pruning.scores(graph)[0] < 1


def test_the_script_traces_a_dense_run_through_its_transcoders(tiny_runs, tmp_path, run_main):
    run = tmp_path / 'dense'
    shutil.copytree(tiny_runs / 'dense', run)
    model, _ = load_model(str(run), 'cpu')
    save_transcoders(model, transcoders_for(model, [0, 1]), tmp_path)
    printed = run_main('toolkit.trace', f'--out_dir={run}', '--prompt=Anna saw the job', f'--transcoders={tmp_path}',
                       '--eval_tokens=0')
    assert 'replacement score' in printed and re.search(r"nodes: [1-9]\d* neurons, 15 error nodes", printed)
    graph = json.loads((run / 'analysis' / 'graph_anna_saw_the_job_transcoders.json').read_text())
    assert {n['layer'] for n in graph['nodes'] if n['feature_type'] == 'cross layer transcoder'} <= {'0', '1'}


def test_an_sae_is_not_traced(tiny_runs, tmp_path, run_main):
    model, _ = load_model(str(tiny_runs / 'dense'), 'cpu')
    save_transcoders(model, {0: dictionary.SparseCoder(32, 64, 4)}, tmp_path, kind='sae')
    with pytest.raises(SystemExit, match="is an SAE, not a transcoder"):
        run_main('toolkit.trace', f'--out_dir={tiny_runs / "dense"}', f'--transcoders={tmp_path}')
