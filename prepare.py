"""
Tokenize a corpus into GPT-2 token shards for train.py (llm.c / modded-nanogpt .bin format).

    python prepare.py                            # FineWeb-Edu sample-10BT, streamed from the HF hub
    python prepare.py --dataset=toy              # the offline synthetic corpus of toy_corpus.py
    python prepare.py --input='dl/*.parquet'     # local .parquet / .jsonl / .txt files ("text")

Every document becomes <|endoftext|> followed by its tokens. The stream is cut, as in llm.c, into
a val shard of --val_tokens tokens and then train shards of --shard_size tokens; a document may
straddle two shards. Stop it at any point (Ctrl-C, kill -9, a lost connection) and run the same
command again: it resumes after the last complete shard, and every shard comes out byte-identical
to an uninterrupted run, because shards are a pure function of the document stream and
prepare_progress.json records where in that stream the next shard begins.
"""
import collections
import glob
import itertools
import json
import multiprocessing
import os
import time

import numpy as np
import pyarrow.parquet as pq  # installed with datasets
from tqdm import tqdm  # installed with datasets

from configurator import configure, die
from toolkit import data, toy_corpus

# -----------------------------------------------------------------------------
dataset = "fineweb-edu"  # fineweb-edu (streamed from the Hugging Face hub) or toy (toy_corpus.py, offline)
name = "sample-10BT"  # which FineWeb-Edu sample to stream: sample-10BT, sample-100BT, sample-350BT
input = ""  # glob of local .parquet/.jsonl/.txt files (column or key "text") to use instead of --dataset
out_dir = ""  # folder for the shards ('' = data/<dataset>, or data/local with --input)
val_tokens = 0  # tokens in the val shard (0 = 10M, or 100k for the toy corpus)
shard_size = 100_000_000  # tokens per train shard
max_tokens = 0  # stop after this many tokens, val included (0 = the whole corpus)
seed = 0  # seed of the toy corpus
# ----------------------------------------------------------------------------- (a leading _: not a flag)
_BATCH_DOCS = 256  # documents per task of the tokenizer processes
_PROGRESS = "prepare_progress.json"
configure(globals())
if dataset == "fineweb-edu" and not input:  # only the hub's stream needs datasets, which takes seconds to import
    from datasets import load_dataset


def tokenized(docs, pool, in_flight):
    """(number of documents, their tokens) for consecutive batches of docs, in order. The batches
    go to a process per core: threads would share one GIL, which tiktoken holds for part of its
    work, so processes tokenize faster than its threaded batch encoder.
    At most in_flight batches are read ahead, as the stream may hold billions of tokens."""
    pending = collections.deque()
    for batch in iter(lambda: list(itertools.islice(docs, _BATCH_DOCS)), []):
        pending.append((len(batch), pool.apply_async(data.tokenize_documents, (batch,))))
        if len(pending) == in_flight:
            n, result = pending.popleft()
            yield n, result.get()
    for n, result in pending:
        yield n, result.get()


# -----------------------------------------------------------------------------
# document sources: each is an iterator of str, always the same documents in the same order


def fineweb_documents():
    try:
        ds = load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train", streaming=True)
    except (OSError, ValueError) as e:  # no connection, or no such sample
        die(f"cannot stream FineWeb-Edu --name={name}: {str(e).splitlines()[0]} "
            "(offline, use --dataset=toy or --input=FILES)")
    return (row["text"] for row in ds.select_columns(["text"]))


def check_input(path):
    """Fail before anything is written if a file cannot give documents."""
    if path.endswith(".parquet"):
        try:
            columns = pq.read_schema(path).names
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            die(f"--input file {path} is not a readable parquet file ({str(e).splitlines()[0]})")
        if "text" not in columns:
            die(f"--input file {path} has no 'text' column (columns: {', '.join(columns)})")
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is not None:
            jsonl_text(first, path, 1)
    elif not path.endswith(".txt"):
        die(f"--input file {path} is not .parquet, .jsonl or .txt")


def jsonl_text(line, path, lineno):
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        die(f"--input file {path} line {lineno} is not a JSON object with a string 'text'")
    return text


def local_documents(paths):
    for path in paths:
        if path.endswith(".parquet"):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_DOCS, columns=["text"]):
                yield from batch.column(0).to_pylist()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                yield from (jsonl_text(line, path, i) for i, line in enumerate(f, 1) if line.strip())
        else:  # .txt: the whole file is one document
            try:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
            except UnicodeDecodeError as e:
                die(f"--input file {path} is not UTF-8 text ({e.reason} at byte {e.start})")


def open_source():
    """(documents, corpus name, what identifies the stream for resuming)."""
    if input:
        if dataset != "fineweb-edu":
            die(f"give either --input or --dataset={dataset}, not both")
        paths = sorted(p for p in glob.glob(os.path.expanduser(input), recursive=True) if os.path.isfile(p))
        if not paths:
            die(f"--input={input!r} matches no file")
        for path in paths:
            check_input(path)
        files = [[os.path.abspath(p), os.path.getsize(p)] for p in paths]
        return (lambda: local_documents(paths)), "local", {"input": files}
    if dataset == "toy":
        return (lambda: iter(toy_corpus.generate(seed=seed))), "toy", {"toy": toy_corpus.N_DOCS, "seed": seed}
    if dataset == "fineweb-edu":
        return fineweb_documents, "fineweb-edu", {"fineweb-edu": name}
    die(f"--dataset must be fineweb-edu or toy, got {dataset!r}")


# -----------------------------------------------------------------------------
# resuming: shard i+1 begins `offset` tokens into the stream of documents doc, doc+1, ...


def load_progress(directory, corpus, settings):
    fresh = {"settings": settings, "shards": 0, "doc": 0, "offset": 0, "done": False}
    path = os.path.join(directory, _PROGRESS)
    if not os.path.exists(path):
        if glob.glob(os.path.join(directory, "*.bin")):
            die(f"--out_dir {directory} already holds .bin files that prepare.py did not record; "
                "choose another --out_dir or delete them")
        return fresh
    with open(path) as f:
        progress = json.load(f)
    if progress["settings"] != settings:
        die(f"--out_dir {directory} holds shards made with other settings "
            f"({progress['settings']}); choose another --out_dir or delete it")
    if not all(os.path.exists(shard_path(directory, corpus, i)) for i in range(progress["shards"])):
        return fresh  # a shard was deleted: start over (shards are rewritten identical)
    return progress


def shard_path(directory, corpus, index):
    return os.path.join(directory, f"{corpus}_{'val' if index == 0 else 'train'}_{index:06d}.bin")


def main():
    if shard_size < 1 or val_tokens < 0 or max_tokens < 0:
        die(f"--shard_size must be positive, --val_tokens and --max_tokens not negative "
            f"(got {shard_size}, {val_tokens}, {max_tokens})")
    documents, corpus, source = open_source()
    n_val = val_tokens or (100_000 if corpus == "toy" else 10_000_000)
    if 0 < max_tokens <= n_val:
        die(f"--max_tokens={max_tokens} leaves no train tokens after --val_tokens={n_val}")
    directory = out_dir or os.path.join("data", corpus)
    settings = {"source": source, "val_tokens": n_val, "shard_size": shard_size, "max_tokens": max_tokens}
    progress = load_progress(directory, corpus, settings)
    if progress["done"]:
        print(f"{directory} is already complete ({progress['shards']} shards); nothing to do")
        return
    for stale in glob.glob(os.path.join(directory, f".tmp_{corpus}_*")):  # left by a kill -9
        os.remove(stale)

    def shard_end(index):  # the stream position (in tokens) where shard `index` ends
        end = n_val + index * shard_size
        return min(end, max_tokens) if max_tokens else end

    def finish_shard(tokens, doc, offset, done):  # the progress is saved once the shard is on disk
        if len(tokens):
            data.write_shard(shard_path(directory, corpus, progress["shards"]), tokens)
        progress.update(shards=progress["shards"] + (len(tokens) > 0), doc=doc, offset=offset, done=done)
        data.atomic_write(os.path.join(directory, _PROGRESS), lambda f: f.write(json.dumps(progress).encode()))

    docs = itertools.islice(documents(), progress["doc"], None)
    doc, skip = progress["doc"], progress["offset"]  # the stream position of the next batch
    start = shard_end(progress["shards"] - 1) if progress["shards"] else 0  # tokens in complete shards
    buf, fill = np.empty(shard_end(progress["shards"]) - start, np.uint16), 0
    data.get_encoding()  # load the BPE tables before the clock starts
    first, t0 = start, time.time()
    workers = os.cpu_count()
    with tqdm(total=max_tokens or None, initial=start, unit="tok", unit_scale=True, desc=directory) as bar, \
            multiprocessing.Pool(workers) as pool:
        for n_docs, tokens in tokenized(docs, pool, 2 * workers):
            pos = min(skip, len(tokens))  # tokens already in shards (only right after a resume)
            skip -= pos
            while pos < len(tokens) and not progress["done"]:
                take = min(len(buf) - fill, len(tokens) - pos)
                buf[fill:fill + take] = tokens[pos:pos + take]
                fill, pos = fill + take, pos + take
                bar.update(take)
                if fill == len(buf):
                    start, fill = start + len(buf), 0
                    finish_shard(buf, doc, pos, start == max_tokens)
                    buf = np.empty(max(0, shard_end(progress["shards"]) - start), np.uint16)
            doc += n_docs
            if progress["done"]:
                break
        if not progress["done"]:  # the end of the corpus: keep the partial last train shard
            if start + fill <= n_val:
                die(f"the corpus has only {start + fill:,} tokens: not enough for "
                    f"--val_tokens={n_val} and a train shard; lower --val_tokens")
            finish_shard(buf[:fill], doc, 0, True)
            start += fill
    seconds = time.time() - t0
    print(f"wrote {start - first:,} tokens to {directory} ({progress['shards']} shards) "
          f"in {seconds:.1f}s: {(start - first) / seconds / 1e6:.2f}M tokens/s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        die("interrupted; run the same command again to resume after the last complete shard")
