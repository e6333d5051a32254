"""
The CPU fast paths, which a script switches on in one line: enable(model).

model.py is the reference, and what runs unless a script opts in. Once enabled, three calls of
that model take a faster route on the CPU, each only where it gives model.py's numbers up to
float rounding, and the reference everywhere else (a GPU, autocast, torch.compile, hooks on the
MLP, alpha > 0):
- the MLP of a TopK block at alpha = 0: sparse_mlp.py, with no d_ff-wide matmul that
  multiplies zeros;
- the training loss when the caller does not want the logits back: fused_loss.py, with no
  (tokens, vocabulary) tensor kept for the backward;
- generate: the weight transposes sparse_mlp.py reads are built once per call (sparse_mlp.decoding).
"""
import functools

from model import GPT, MLP, TopK
from toolkit import fused_loss, sparse_mlp


def mlp_forward(mlp, x):
    if isinstance(mlp.act, TopK) and sparse_mlp.applies(mlp, x):
        return mlp.dropout(sparse_mlp.topk_mlp(x, mlp.c_fc, mlp.c_proj, mlp.act.k, mlp.act.gelu))
    return MLP.forward(mlp, x)


def gpt_forward(model, idx, targets=None, cache=None, return_logits=True):
    if targets is None or return_logits or not fused_loss.applies(model.lm_head.weight):
        return GPT.forward(model, idx, targets, cache, return_logits)
    return None, fused_loss.cross_entropy(model.trunk(idx, cache), model.lm_head.weight, targets)


def enable(model):
    """Route model's TopK MLPs, loss and generate through the fast paths; returns the model. It
    sets instance attributes only: the weights, state_dict and checkpoints are untouched. A model
    off the CPU is returned as it is, so a GPU (and torch.compile) runs model.py's code."""
    if next(model.parameters()).device.type != "cpu":
        return model
    for m in model.modules():
        if isinstance(m, MLP) and isinstance(m.act, TopK):
            m.forward = functools.partial(mlp_forward, m)
    model.forward = functools.partial(gpt_forward, model)
    model.generate = sparse_mlp.decoding()(model.generate)
    return model
