"""
The pieces every script shares, each in one place: the tokenizer, token shards,
checkpoints (atomic writes, safe loads), and the device / precision context.
"""
import contextlib
import ctypes
import functools
import glob
import os
import re
import tempfile

import numpy as np

from configurator import die

# torch is imported inside the functions that use it: prepare.py needs none of them and so
# starts without torch's 1.5 s import

EOT = 50256  # <|endoftext|> in GPT-2 BPE; it precedes every document
VOCAB_SIZE = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls

# -----------------------------------------------------------------------------
# tokenizer


@functools.lru_cache(maxsize=None)
def get_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads the BPE files on first use
        die(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 files")


def encode(text):
    return get_encoding().encode_ordinary(text)


def decode(ids):
    return get_encoding().decode(list(ids))


def encode_prompt(text, flag="--start"):
    """A generation prompt: the text (or, as FILE:path, a file's text) after <|endoftext|>,
    so the model starts it as a new document, as every training document started."""
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            die(f"{flag}: cannot read {text[5:]!r}: {e.strerror}")
    if not text.strip():
        die(f"{flag} is empty: give some text to continue")
    return [EOT] + encode(text)


# -----------------------------------------------------------------------------
# atomic writes: a crash leaves either the old file or the new one, never half of one


UMASK = os.umask(0o022)  # the process's umask: reading it means setting it, so set it back
os.umask(UMASK)


def atomic_write(path, write_fn):
    """Call write_fn(file) on a temporary file beside path, fsync it, then rename onto path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_" + os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes owner-only files; use the usual mode
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


# -----------------------------------------------------------------------------
# token shards in llm.c / modded-nanogpt format: 256 int32 header, then uint16 tokens

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"token ids out of uint16 range for shard {path}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    atomic_write(path, lambda f: (f.write(header.tobytes()), f.write(tokens.astype(np.uint16).tobytes())))


def read_shard(path, vocab_size=None):
    """Memory-map a shard's tokens, checking its header and length; errors name the file."""
    try:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        die(f"cannot read shard {path}: {e.strerror}")
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        die(f"{path} is not a token shard (bad magic number; expected llm.c format {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        die(f"{path} has shard version {header[1]}, expected {SHARD_VERSION}")
    n = int(header[2])
    expected = HEADER_INTS * 4 + 2 * n
    if os.path.getsize(path) != expected:
        die(f"{path} is truncated or padded: header says {n} tokens "
            f"({expected} bytes), file has {os.path.getsize(path)} bytes")
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))
    if vocab_size is not None and n and int(tokens.max()) >= vocab_size:
        die(f"{path} holds token id {int(tokens.max())}, beyond the vocabulary size {vocab_size}")
    return tokens


def shard_paths(data_dir, split):
    """The shards of a split: .bin files whose names contain 'train' or 'val', in name order."""
    if not os.path.isdir(data_dir):
        die(f"data_dir {data_dir!r} does not exist (run prepare.py first)")
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, "*.bin"))
                   if split in os.path.basename(p))
    if not paths:
        die(f"no {split} shards (*{split}*.bin) in data_dir {data_dir!r} (run prepare.py first)")
    return paths


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(checkpoint, path):
    import torch
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by train.py. weights_only=True: no pickled code is run."""
    import torch
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


def file_stamp(path):
    """Size and modification time of a file: what tells a cache that the file it was made from changed."""
    return f"{os.path.getsize(path)}-{os.stat(path).st_mtime_ns}"


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
    step maps them again and the kernel zeroes every page on first touch; for a small model on 2
    cores that is half of the step (RESULTS.md, Performance). Freed memory then stays in the process for
    reuse: its footprint stays at its peak, which a training loop reaches every step anyway."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks come from the heap too, not from mmaps of their own
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # never shrink the heap (-1 is read as SIZE_MAX)


def resolve_device(device):
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def native_bf16(capability):
    """Whether a GPU of this compute capability (major, minor) computes in bf16 natively: Ampere
    (8.0) and later. Older ones (V100 7.0, T4 7.5) only emulate it, slowly, though
    torch.cuda.is_bf16_supported() says True there."""
    return tuple(capability) >= (8, 0)


def resolve_dtype(dtype, device):
    """'auto' is bf16 on a GPU that computes in it natively, float16 (with a GradScaler in
    train.py) on an older GPU, fp32 on the CPU."""
    import torch
    if dtype == "auto":
        if not device.startswith("cuda"):
            dtype = "float32"
        else:
            dtype = "bfloat16" if native_bf16(torch.cuda.get_device_capability(device)) else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        die(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def autocast(device, dtype):
    """Mixed precision on CUDA (bf16 / fp16 autocast); plain fp32 on CPU."""
    import torch
    if dtype == "float32" or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))


# Dense (no sparsity) bf16 tensor-core peak FLOP/s (fp16 for the V100, which has no bf16), for
# model FLOPs utilisation. A row matches when every one of its words is a word of the device
# name, as torch.cuda.get_device_name spells it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"):
# whole words, so "L4" is not found in "L40S". The first matching row wins, so a variant (NVL,
# PCIe) comes before its family; a name no row matches gets no MFU rather than a wrong one.
PEAK_FLOPS = ((("H100", "NVL"), 835e12), (("H100", "PCIE"), 756e12), (("H100",), 989e12),
              (("H200", "NVL"), 835e12), (("H200",), 989e12), (("A100",), 312e12),
              (("L40S",), 362e12), (("L40",), 181e12), (("L4",), 121e12), (("A10",), 125e12),
              (("RTX", "4090"), 165e12), (("RTX", "3090"), 71e12), (("V100",), 125e12))


def gpu_peak_flops(name):
    words = set(re.split(r"[\s_-]+", name.upper()))
    return next((peak for needed, peak in PEAK_FLOPS if words.issuperset(needed)), None)


def peak_flops(device):
    """The peak of the GPU at device, found by its name; None where unknown (CPU, new GPUs)."""
    import torch
    if not str(device).startswith("cuda"):
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))
