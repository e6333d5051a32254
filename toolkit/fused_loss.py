"""
The training loss without a (tokens, vocabulary) tensor to keep: the same numbers as
model.py's F.cross_entropy(lm_head(x), targets), a chunk of tokens at a time.

With GPT-2's 50,304-entry vocabulary the logits of a batch are the largest tensors of a small
model's training step: 2,048 tokens make 412 MB of logits, and cross-entropy keeps as much again
for its backward, then allocates the gradient of both. That is more than all the activations of
a 6-layer, 384-wide model, and it would hide what TopK saves (bench.py). Since the loss is the
last thing computed, its gradients can be computed at once, in the forward, chunk by chunk:

    p = softmax(x_c W^T)                  a (chunk, V) temporary
    loss += logsumexp(x_c W^T) - (x_c W^T)[target]
    d logits = (p - onehot(target)) / n   n = the number of targets that are not -1
    dx_c = d logits W,   dW += d logits^T x_c

which are the three matmuls of the usual forward and backward, with no recomputation. The
backward then only scales dx and dW by the incoming gradient. A model with cpu_fast.py's paths
on takes this one when the caller does not want the logits back (train.py), on CPU in fp32/fp64
(see `applies`); elsewhere, model.py's F.cross_entropy, which torch.compile fuses on a GPU.
"""
import torch

CHUNK_BYTES = 32 * 2**20  # size of the (chunk, V) temporary: 166 tokens of GPT-2's vocabulary in fp32


def applies(weight):
    """Whether a loss through this output weight may take this path: training (gradients on) in
    fp32/fp64 on the CPU, not under autocast or torch.compile, where F.cross_entropy is fused."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
            and torch.is_grad_enabled() and weight.requires_grad
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def cross_entropy(x, weight, targets):
    """Mean cross-entropy of softmax(x @ weight.T) against targets (-1 = ignored); x (..., C)."""
    return LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1))


class LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, targets):
        n = (targets != -1).sum().clamp(min=1)
        loss = x.new_zeros(())
        dx, dw = torch.empty_like(x), torch.zeros_like(weight)
        rows = max(1, CHUNK_BYTES // (weight.size(0) * weight.element_size()))
        for i in range(0, len(x), rows):
            xc, tc = x[i:i + rows], targets[i:i + rows]
            counted = (tc != -1).to(x.dtype)
            tc = tc.clamp(min=0)
            p = xc @ weight.t()  # this chunk's logits
            lse = p.logsumexp(1)
            loss += ((lse - p.gather(1, tc[:, None])[:, 0]) * counted).sum()
            p.sub_(lse[:, None]).exp_()  # softmax, in place
            p[torch.arange(len(tc), device=p.device), tc] -= 1  # minus the one-hot target
            p.mul_(counted[:, None] / n)
            torch.mm(p, weight, out=dx[i:i + rows])
            dw.addmm_(p.t(), xc)
        ctx.save_for_backward(dx, dw)
        return loss / n

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return dx * g, dw * g, None
