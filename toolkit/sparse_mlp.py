"""
The TopK MLP at alpha = 0, computed sparsely: the same numbers as model.py's
c_proj(TopK(c_fc(h))), without the d_ff-wide matmuls that multiply zeros.

At alpha = 0 a token keeps k of its d_ff neurons, idx, with activations a = gelu(x[idx]).
Writing W_fc (d_ff, C) and W_proj (C, d_ff) for the two weights and g for the gradient of
the output, every product except x = h W_fc^T + b_fc involves only those k neurons:

    out        = sum_j a_j W_proj[:, idx_j] + b_proj       k columns of W_proj, not d_ff
    da_j       = g . W_proj[:, idx_j]                      a sampled matmul (k dot products)
    dx_j       = da_j gelu'(x[idx_j]), 0 off the k         (the mask itself has no gradient)
    dh         = sum_j dx_j W_fc[idx_j]                    k rows of W_fc
    dW_proj[:, f] = sum_t a_tf g_t,  dW_fc[f] = sum_t dx_tf h_t   over the tokens t that kept f

So only c_fc's forward and the top-k selection stay dense; the rest is done with
F.embedding_bag (a weighted sum of k gathered rows), torch.sparse.sampled_addmm and
sparse-CSR @ dense matmuls, which on a CPU makes the whole TopK MLP faster than the dense one
(bench.py measures it). A script switches it on with cpu_fast.enable(model), and it runs only
where it gives the reference's numbers up to float rounding (see `applies`); CUDA keeps the reference path: there the dense matmuls run on tensor cores
and cost less than gathers at k = 64, and sparse CSR tensors do not go through torch.compile.
"""
import contextlib
import warnings

import torch
from torch.nn import functional as F
from torch.nn.modules import module as nn_module

enabled = True  # off: the reference path (bench.py and the tests use switched(), below)
transposed_fc = True  # inference reads a contiguous W_fc^T too (see decoding()); bench.py times without it as well
_kept = None  # {id(weight): (weight, its transpose)} while decoding() is on, else None


@contextlib.contextmanager
def switched(fast, keep_fc_transposed=True):
    """Inside the block the sparse path is on (fast) or off, and decoding keeps W_fc^T or not;
    both switches are restored afterwards, an error included."""
    global enabled, transposed_fc
    saved = enabled, transposed_fc
    enabled, transposed_fc = fast, keep_fc_transposed
    try:
        yield
    finally:
        enabled, transposed_fc = saved


def _hooked(module):
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def applies(mlp, x):
    """Whether the MLP of a TopK block may take the sparse path on input x. Hooks on its
    modules read or steer tensors this path never builds (the dense activation: steering, neuron
    analysis), so they force the reference. alpha = 0 is read from the Python flag TopK keeps,
    never from the alpha tensor (a read-back would sync, and break a torch.compile graph)."""
    return (enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not any(map(_hooked, (mlp.c_fc, mlp.act, mlp.c_proj)))
            and not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                     or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)
            and mlp.act.annealed)


@contextlib.contextmanager
def decoding():
    """generate runs inside this block (cpu_fast.enable): the weights hold still while it decodes, so the
    transposes the sparse path needs are built once, for the first token, and kept until the
    call returns. For c_proj they are the (d_ff, C) rows that embedding_bag gathers; for c_fc,
    the (C, d_ff) layout in which the one-token matmul of decoding reads the weight fastest (MKL
    streams it faster than F.linear's (d_ff, C); bench.py times decoding with and without it). Transposing reads the whole matrix, as much work as the dense matvec of one
    token, which would undo the saving if done at every token. Nothing is kept across calls, so
    the next call sees any change to the weights, a write through `w.data` included (which, unlike
    in-place updates, does not advance a tensor's version counter)."""
    global _kept
    saved, _kept = _kept, {}
    try:
        yield
    finally:
        _kept = saved


def _transposed(w):
    """w^T as a contiguous matrix: kept for the rest of the call inside decoding(), else built anew."""
    if _kept is None:
        return w.detach().t().contiguous()
    hit = _kept.get(id(w))
    if hit is None:  # the weight itself is kept too, so its id is not reused while the entry lives
        hit = _kept[id(w)] = (w, w.detach().t().contiguous())
    return hit[1]


def topk_mlp(x, c_fc, c_proj, k, gelu='none'):
    """c_proj(TopK_k(c_fc(x))) at alpha = 0 for x of shape (..., C); gelu is torch's `approximate`."""
    h = x.reshape(-1, x.size(-1))
    if torch.is_grad_enabled():
        out = TopKMLP.apply(h, c_fc.weight, c_fc.bias, c_proj.weight, c_proj.bias, k, gelu)
    else:  # inference, e.g. decoding, which runs the same weights again and again (see decoding())
        w_fc_t = _transposed(c_fc.weight) if transposed_fc else c_fc.weight.t()
        out = _forward(h, w_fc_t, c_fc.bias, _transposed(c_proj.weight), c_proj.bias, k, gelu)[0]
    return out.view(x.shape)


def _forward(h, w_fc_t, b_fc, w_proj_t, b_proj, k, gelu):
    """The output, and the pre-activations and indices of the k kept neurons of every token.
    w_fc_t is W_fc^T: a view of the weight (training) or a contiguous copy (inference)."""
    x = h @ w_fc_t if b_fc is None else torch.addmm(b_fc, h, w_fc_t)  # = F.linear(h, W_fc, b_fc)
    pre, idx = x.topk(k, dim=-1)  # TopK.forward's very call, so ties pick the same neurons
    # each neuron's output vector is a row of W_proj^T; embedding_bag sums the k weighted rows
    out = F.embedding_bag(idx, w_proj_t, per_sample_weights=F.gelu(pre, approximate=gelu), mode="sum")
    if b_proj is not None:
        out += b_proj
    return out, pre, idx


def _csr(crow, col, values, shape):
    with warnings.catch_warnings():  # "CSR support is in beta": the few kernels used here are not
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class TopKMLP(torch.autograd.Function):
    """The MLP of a TopK block at alpha = 0 on tokens h (N, C). Saved for the backward: h,
    the weights, and k pre-activations and indices per token; no (N, d_ff) tensor."""

    @staticmethod
    def forward(ctx, h, w_fc, b_fc, w_proj, b_proj, k, gelu):
        out, pre, idx = _forward(h, w_fc.t(), b_fc, w_proj.t().contiguous(), b_proj, k, gelu)
        ctx.save_for_backward(h, w_fc, w_proj, pre, idx)
        ctx.biases, ctx.gelu = (b_fc is not None, b_proj is not None), gelu
        return out

    @staticmethod
    def backward(ctx, g):
        h, w_fc, w_proj, pre, idx = ctx.saved_tensors
        need_h, need_wfc, need_bfc, need_wproj, need_bproj, _, _ = ctx.needs_input_grad
        (N, k), d_ff = idx.shape, w_fc.size(0)
        idx, order = idx.sort(dim=-1)  # CSR lists a row's column indices in increasing order
        pre = pre.gather(1, order)
        act = F.gelu(pre, approximate=ctx.gelu)
        # (N, d_ff) pattern of the kept neurons: row t holds exactly k entries
        by_token = torch.arange(0, N * k + 1, k, device=idx.device)
        da = torch.sparse.sampled_addmm(_csr(by_token, idx.flatten(), act.flatten(), (N, d_ff)),
                                        g, w_proj, beta=0).values().view(N, k)
        dx = torch.ops.aten.gelu_backward(da, pre, approximate=ctx.gelu)
        dh = F.embedding_bag(idx, w_fc, per_sample_weights=dx, mode="sum") if need_h else None
        # the transposed (d_ff, N) pattern: row f lists, in order, the tokens that kept neuron f
        neurons = idx.flatten()
        perm = neurons.argsort(stable=True)
        by_neuron = torch.zeros(d_ff + 1, dtype=torch.long, device=idx.device)
        by_neuron[1:] = torch.bincount(neurons, minlength=d_ff).cumsum(0)
        tokens = perm // k

        def per_neuron(values):  # sum_t values_tf * dense_t for every neuron f, as (d_ff, N) @ dense
            return _csr(by_neuron, tokens, values.flatten()[perm], (d_ff, N))

        dw_fc = per_neuron(dx) @ h if need_wfc else None
        db_fc = torch.zeros(d_ff, dtype=dx.dtype, device=dx.device).index_add_(
            0, neurons, dx.flatten()) if need_bfc and ctx.biases[0] else None
        dw_proj = (per_neuron(act) @ g).t() if need_wproj else None
        db_proj = g.sum(0) if need_bproj and ctx.biases[1] else None
        return dh, dw_fc, db_fc, dw_proj, db_proj, None, None
