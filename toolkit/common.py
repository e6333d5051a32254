"""
What the scripts share about runs: checkpoints (saved atomically, loaded safely, made into a
model), a run's folder and snapshots, and the device and precision a script runs in.
"""
import contextlib
import ctypes
import glob
import os
import re

import torch

from configurator import die
from model import GPT, GPTConfig
from toolkit.data import atomic_write

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by train.py. weights_only=True: no pickled code is run."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupted, or holding pickled objects
        die(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        die(f"{path} is not a TopK LM checkpoint (no 'model' / 'model_args' entries)")
    return checkpoint


def load_model(path, device="cpu"):
    """A trained model ready for inference: eval mode, alpha = 0 (fully sparse).
    path is an out_dir (its ckpt.pt) or a checkpoint file. Returns (model, checkpoint)."""
    checkpoint = load_checkpoint(path, "cpu")  # on the CPU first: the optimizer state is never sent to a GPU
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        die(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0][:160]}")
    model.set_alpha(0.0)
    return model.to(device).eval(), checkpoint


def run_folder(path):
    """The folder of the run at path, an out_dir or one of its checkpoint files: where a script
    writes what it makes of the run (its analysis/ folder)."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def run_checkpoints(run):
    """[(iter, path)] of a run's checkpoints in training order: the ckpt_{iter}.pt series, and
    ckpt.pt where no snapshot has its iteration."""
    series = {int(os.path.basename(p)[5:-3]): p for p in glob.glob(os.path.join(run, "ckpt_*.pt"))}
    final = os.path.join(run, "ckpt.pt")
    if not os.path.isfile(final):
        die(f"no final checkpoint {final}")
    series.setdefault(load_checkpoint(final)["iter_num"], final)
    return sorted(series.items())


# -----------------------------------------------------------------------------
# device and precision


def keep_freed_memory():
    """On Linux, stop glibc from giving large freed blocks back to the kernel. It does so for every
    block over 32 MB (on a CPU: the (tokens, 50304) logits and their gradients), so each training
    step maps them again and the kernel zeroes every page on first touch, which for a small model
    is a large part of the step (RESULTS.md, Performance). Freed memory then stays in the process for
    reuse: its footprint stays at its peak, which a training loop reaches every step anyway."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks come from the heap too, not from mmaps of their own
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # never shrink the heap (-1 is read as SIZE_MAX)


# What train.py takes on each kind of device, by what torch supports there: the dtypes autocast
# computes in, torch.compile (worth its compile time on CUDA only; inductor's Metal backend is a
# prototype), fused AdamW, and pinned host memory for copies that overlap with compute. Apple's MPS
# has autocast from torch 2.5 (bf16 from macOS 14) and fused AdamW; its float16 is scaled by the
# GradScaler as CUDA's is. 'auto' takes float32 there, the dtype every Apple GPU runs.
DEVICES = {
    "cuda": dict(dtypes=("float32", "bfloat16", "float16"), compile=True, fused_adamw=True, pin_memory=True),
    "mps": dict(dtypes=("float32", "bfloat16", "float16"), compile=False, fused_adamw=True, pin_memory=False),
    "cpu": dict(dtypes=("float32", "bfloat16"), compile=False, fused_adamw=False, pin_memory=False),
}


def device_facts(device):
    """DEVICES' row for a device name ('cuda:1' is 'cuda')."""
    kind = device.split(":")[0]
    if kind not in DEVICES:
        die(f"--device={device} is not one of auto, {', '.join(DEVICES)} (optionally with :INDEX)")
    return DEVICES[kind]


def resolve_device(device):
    """'auto' is CUDA, else Apple's MPS, else the CPU, whichever this machine has first."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_facts(device)  # a kind the table knows
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not present[device.split(":")[0]]:
        die(f"--device={device}, but torch finds no such device here (--device=auto takes what there is)")
    return device


def native_bf16(capability):
    """Whether a GPU of this compute capability (major, minor) computes in bf16 natively: Ampere
    (8.0) and later. Older ones (V100 7.0, T4 7.5) only emulate it, slowly, though
    torch.cuda.is_bf16_supported() says True there."""
    return tuple(capability) >= (8, 0)


def resolve_dtype(dtype, device):
    """'auto' is bf16 on a CUDA GPU that computes in it natively, float16 (with a GradScaler in
    train.py) on an older one, fp32 elsewhere; a dtype the device has no autocast for is refused."""
    if dtype == "auto":
        if not device.startswith("cuda"):
            dtype = "float32"
        else:
            dtype = "bfloat16" if native_bf16(torch.cuda.get_device_capability(device)) else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        die(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    supported = device_facts(device)["dtypes"]
    if dtype not in supported:
        die(f"--dtype={dtype} is not supported on {device}; use {' or '.join(supported)}")
    return dtype


def autocast(device, dtype):
    """Mixed precision (the dtypes of DEVICES' row); none for fp32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# Dense (no sparsity) bf16 tensor-core peak FLOP/s (fp16 for the V100, which has no bf16), for
# model FLOPs utilisation. A row matches when every one of its words is a word of the device
# name, as torch.cuda.get_device_name spells it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"):
# whole words, so "L4" is not found in "L40S". The first matching row wins, so a variant (NVL,
# PCIe) comes before its family; a name no row matches gets no MFU rather than a wrong one.
PEAK_FLOPS = ((("H100", "NVL"), 835e12), (("H100", "PCIE"), 756e12), (("H100",), 989e12),
              (("H200", "NVL"), 835e12), (("H200",), 989e12), (("A100",), 312e12),
              (("L40S",), 362e12), (("L40",), 181e12), (("L4",), 121e12), (("A10",), 125e12),
              (("RTX", "4090"), 165e12), (("RTX", "3090"), 71e12), (("V100", "PCIE"), 112e12), (("V100",), 125e12))


def gpu_peak_flops(name):
    words = set(re.split(r"[\s_-]+", name.upper()))
    return next((peak for needed, peak in PEAK_FLOPS if words.issuperset(needed)), None)


def peak_flops(device):
    """The peak of the GPU at device, found by its name; None where unknown (CPU, new GPUs)."""
    if not str(device).startswith("cuda"):
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))
