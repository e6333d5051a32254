"""
The two memory measurements of bench.py: what one call allocates at its high point (peak_memory),
and what autograd keeps from a forward for its backward (saved_for_backward), on CPU and CUDA.
"""
import contextlib
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C++ log lines (start, stop, a note on blocks allocated before it)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn, device):
    """Bytes allocated at the high point of fn() beyond what was allocated when it began. For a
    training step that is activations, gradients and temporaries, not the weights and optimizer
    state that persist between steps. CUDA: the allocator's own statistics. CPU: PyTorch keeps
    none, so the profiler's record of every allocation (with its running total) is read back."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, "trace.json"))
        with open(os.path.join(d, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"]["Device Type"] == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - base


def weight_copy(t, params):
    """Whether t is a parameter's autocast copy (bf16 or fp16, as saved for the backward, perhaps
    transposed): the same numbers, one per step, so not an activation."""
    return t.dim() == 2 and t.dtype != torch.float32 and any(
        w.shape == t.shape and torch.equal(w.to(t.dtype), t) for p in params if p.dim() == 2 for w in (p, p.t()))


def saved_for_backward(params, fwd, x, y, ctx):
    """Bytes of the tensors autograd keeps from the forward fwd (the timed model, compiled or not)
    for the backward, each storage once, the weights and their autocast copies excluded: the
    activation memory that TopK's sparse path and lean activation are meant to shrink."""
    params = list(params)
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights and not weight_copy(t, params):
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        fwd(x, y, return_logits=False)
    return sum(storages.values())
