"""
Text and files: the GPT-2 tokenizer, token shards, and writes that a crash cannot leave half done.
Nothing here needs torch, so prepare.py starts without importing it.
"""
import functools
import glob
import os
import re
import tempfile

import numpy as np
import tiktoken

from configurator import die

EOT = 50256  # <|endoftext|> in GPT-2 BPE; it precedes every document
VOCAB_SIZE = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
N_TOKENS = EOT + 1  # the tokenizer's vocabulary: ids from here to VOCAB_SIZE are padding, never text

# -----------------------------------------------------------------------------
# tokenizer


@functools.lru_cache(maxsize=None)
def get_encoding():
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


def tokenize_documents(docs):
    """The GPT-2 tokens of docs (a list of str) as one uint16 array, <|endoftext|> before each.
    encode_to_numpy is encode_ordinary (no special tokens allowed, none rejected) returning an
    array, so no Python int is made per token."""
    encoding, eot = get_encoding(), np.array([EOT], dtype=np.uint32)
    parts = [a for doc in docs for a in (eot, encoding.encode_to_numpy(doc, disallowed_special=()))]
    return np.concatenate(parts or [eot[:0]]).astype(np.uint16)



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
    # header[3], unused by llm.c, keeps the largest id + 1 (0: not recorded), so that the vocabulary
    # check at every start reads 1 KB per shard rather than every token
    header[:4] = (SHARD_MAGIC, SHARD_VERSION, len(tokens), int(tokens.max()) + 1 if tokens.size else 0)
    atomic_write(path, lambda f: (f.write(header.tobytes()), f.write(tokens.astype(np.uint16).tobytes())))


def read_shard(path, vocab_size=None):
    """Memory-map a shard's tokens, checking its header, its length and (given vocab_size) that every
    id is in the vocabulary; errors name the file."""
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
    if vocab_size is not None and n:
        largest = int(header[3]) - 1 if header[3] > 0 else int(tokens.max())  # a shard of another writer: read it all
        if largest >= vocab_size:
            die(f"{path} holds token id {largest}, beyond the vocabulary size {vocab_size}")
    return tokens


def load_splits(data_dir, vocab_size, block_size):
    """{'train': [shard, ...], 'val': [...]} of data_dir, memory-mapped, every token id checked against
    the vocabulary, and each split with a shard longer than block_size (where a window fits)."""
    splits = {s: [read_shard(p, vocab_size) for p in shard_paths(data_dir, s)] for s in ('train', 'val')}
    for s, shards in splits.items():
        longest = max(len(t) for t in shards)
        if longest <= block_size:
            die(f"--block_size={block_size} needs shards longer than it, "
                f"but the longest {s} shard in {data_dir} has {longest} tokens")
    return splits


def shard_paths(data_dir, split):
    """The shards of a split, in name order: .bin files whose names hold 'train' or 'val' as a word
    between '_', '-', '.' or the ends (NAME_val_000000.bin, llm.c's tiny_shakespeare_val.bin), so a
    train shard of a corpus named 'medieval' is not read as validation data."""
    if not os.path.isdir(data_dir):
        die(f"data_dir {data_dir!r} does not exist (run prepare.py first)")
    word = re.compile(rf"(^|[_.-]){split}([_.-]|$)")
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, "*.bin")) if word.search(os.path.basename(p)))
    if not paths:
        die(f"no {split} shards (NAME_{split}_000000.bin) in data_dir {data_dir!r} (run prepare.py first)")
    return paths


def file_stamp(path):
    """Size and modification time of a file: what tells a cache that the file it was made from changed."""
    return f"{os.path.getsize(path)}-{os.stat(path).st_mtime_ns}"
