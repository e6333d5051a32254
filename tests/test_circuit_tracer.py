"""trace.py against circuit-tracer (decoderesearch/circuit-tracer, PyPI circuit-tracer 0.5.0): its
attribution graph of a TopK LM, whose TopK blocks' MLPs are hosted as circuit-tracer
SingleLayerTranscoders with no reconstruction error, has trace.attribute's edges; and the graph
file trace.py writes is read by circuit-tracer's own graph model (the one its viewer's server uses).

The MLP as a transcoder: encoder c_fc reading blocks.L.mlp.hook_in (ln_2's output, LayerNorm's
weight and bias applied; its 1/sigma frozen by circuit-tracer), the model's own TopK as the
activation function (circuit-tracer's TopK keeps x, not GELU(x), of the k kept), decoder c_proj
with its bias as b_dec. A dense block is a transcoder with no active latent and b_dec = c_proj's
bias, so its error node is what trace.py's is: the MLP output less that bias.

Where circuit-tracer's conventions differ from trace.py's, the test sets them to trace.py's:
- position 0: circuit-tracer drops its latents and error (zero_positions, for the BOS token);
  trace.py keeps them as nodes: zero_positions = slice(0, 0).
- token nodes: circuit-tracer's vector is the token embedding alone (W_E[token] at hook_embed),
  trace.py's is wte + wpe: setup_attribution adds W_pos to the token vectors.
- logits: circuit-tracer's targets are demeaned unembedding columns (logit - mean logit),
  trace.py's the logits themselves: the targets are given as custom targets with W_U's columns.
- error nodes: circuit-tracer has one per layer and position; trace.py only for the dense blocks
  (a TopK block is its own transcoder): the TopK blocks' error columns must be zero.

circuit-tracer comes from toolkit/requirements-circuit-tracer.txt (installed without its
dependencies: that file says why).
"""
import shutil

import pytest
import torch

from conftest import TRACE_PROMPT as PROMPT, import_or_skip
import_or_skip(("transformers", "transformer_lens", "circuit_tracer"), "toolkit/requirements-circuit-tracer.txt")

from circuit_tracer import attribute as circuit_tracer_attribute  # noqa: E402
from circuit_tracer.frontend import graph_models as circuit_tracer_graph  # noqa: E402
from circuit_tracer.replacement_model.replacement_model_transformerlens import (  # noqa: E402
    TransformerLensReplacementModel)
from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformers import GPT2TokenizerFast  # noqa: E402

from model import topk_layers  # noqa: E402
from toolkit import interop, trace  # noqa: E402


class PositionedTokens(TransformerLensReplacementModel):
    """circuit-tracer's replacement model with trace.py's token nodes: token plus position embedding."""

    def setup_attribution(self, inputs):
        ctx = super().setup_attribution(inputs)
        ctx.token_vectors = ctx.token_vectors + self.W_pos[:len(ctx.token_vectors)]
        return ctx


def replacement_model(model, tokenizer):
    """The model in TransformerLens (interop.hooked), each block's MLP a circuit-tracer transcoder."""
    c = model.config
    args, weights = interop.tl_weights(model)
    tl = interop.hooked(HookedTransformerConfig(**args), weights, c.topk, c.n_nontopk, tokenizer,
                        cls=PositionedTokens)
    sparse = topk_layers(c.n_layer, c.topk, c.n_nontopk)
    transcoders = {}
    for l, block in enumerate(model.transformer.h):
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        act = tl.blocks[l].mlp.act_fn if l in sparse else torch.zeros_like  # the model's TopK; none active
        tc = SingleLayerTranscoder(c.n_embd, fc.out_features, act, l, device=torch.device('cpu'), dtype=torch.float32)
        with torch.no_grad():
            if l in sparse:
                tc.W_enc.copy_(fc.weight)
                tc.b_enc.copy_(fc.bias)
                tc.W_dec.copy_(proj.weight.t())
            tc.b_dec.copy_(proj.bias)
        transcoders[l] = tc
    tl._configure_replacement_model(TranscoderSet(transcoders, feature_input_hook='mlp.hook_in',
                                                  feature_output_hook='mlp.hook_out'))
    tl.zero_positions = slice(0, 0)  # position 0's latents and error as nodes, as in trace.py
    return tl


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch, on circuit-tracer's backward pass
@pytest.mark.parametrize("gelu", ["none", "tanh"])
def test_circuit_tracers_graph_of_a_topk_lm_has_trace_pys_edges(tiny_model, tmp_path, gelu):
    model = tiny_model(gelu=gelu)
    interop.write_tokenizer(tmp_path)
    tl = replacement_model(model, GPT2TokenizerFast.from_pretrained(tmp_path))
    ours = trace.attribute(model, PROMPT)
    targets = [(str(t), float(p), tl.W_U[:, t].detach())
               for t, p in zip(ours['logit_ids'].tolist(), ours['logit_probabilities'].tolist())]
    graph = circuit_tracer_attribute(PROMPT, tl, attribution_targets=targets, batch_size=64)

    n, T, L = ours['n_neurons'], ours['n_tokens'], model.config.n_layer
    assert [tuple(f) for f in graph.active_features.tolist()] == [node[1:] for node in ours['nodes'][:n]]
    torch.testing.assert_close(graph.activation_values, ours['activation'][:n], rtol=1e-5, atol=1e-6)

    # our nodes in circuit-tracer's graph: latents, error (layer, pos) at n + layer * T + pos, tokens, logits
    B = graph.adjacency_matrix
    errors = [n + l * T + p for _, l, p, _ in ours['nodes'][n:n + ours['n_errors']]]
    index = torch.tensor([*range(n), *errors, *range(n + L * T, n + (L + 1) * T),
                          *range(len(B) - len(targets), len(B))])
    assert ours['error_layers'] == [L - 1] and len(errors) == T  # the dense block alone
    torch.testing.assert_close(B[index][:, index], ours['adjacency'], rtol=1e-4, atol=1e-6)
    assert ours['adjacency'].abs().max() > 0.1  # not a graph of zeros
    rest = torch.ones(len(B), dtype=torch.bool)
    rest[index] = False
    assert rest.sum() == (L - 1) * T and B[:, rest].abs().max() < 1e-6  # the TopK blocks' errors: none


def test_trace_pys_graph_file_is_read_by_circuit_tracers_graph_model(tiny_runs, tmp_path, run_main):
    run = tmp_path / 'topk'
    shutil.copytree(tiny_runs / 'topk', run)
    run_main('toolkit.trace', f'--out_dir={run}', '--prompt=Anna saw the job', '--node_threshold=1.0')
    text = (run / 'analysis' / 'graph_anna_saw_the_job.json').read_text()
    graph = circuit_tracer_graph.Model.model_validate_json(text)  # what its viewer's server loads
    assert graph.metadata.prompt_tokens == ['<|endoftext|>', 'Anna', ' saw', ' the', ' job']
    ids = [node.node_id for node in graph.nodes]
    assert len(set(ids)) == len(ids) and {'embedding', 'logit', 'cross layer transcoder'} <= {
        node.feature_type for node in graph.nodes}
    for node in graph.nodes:  # a neuron's id and feature as circuit-tracer's own constructor makes them
        if node.feature_type == 'cross layer transcoder':
            layer, j, pos = map(int, node.node_id.split('_'))
            made = circuit_tracer_graph.Node.feature_node(layer, pos, j)
            assert (node.node_id, node.feature, node.layer, node.ctx_idx) == (made.node_id, made.feature, made.layer, made.ctx_idx)
    assert all(circuit_tracer_graph.Link(**link).source in ids for link in graph.links)
