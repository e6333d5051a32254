"""
Tests of prepare.py and toy_corpus.py:  python -m pytest -q tests/test_prepare.py
prepare.py runs as a subprocess, as a user runs it, on a real FineWeb-Edu sample (conftest.FINEWEB_SAMPLE).
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FINEWEB_SAMPLE, HERE
from toolkit import data, toy_corpus


SMALL = ["--val_tokens=5000", "--shard_size=20000"]  # the 150-doc sample: one val + 5 train shards


def run(*args, env=None, script=None):
    cmd = [sys.executable] + (["-c", script] if script else [os.path.join(HERE, "prepare.py")]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env={**os.environ, **(env or {})})


def shards(directory):
    """{file name: bytes} of every shard, to compare whole outputs."""
    return {f.name: f.read_bytes() for f in sorted(pathlib.Path(directory).glob("*.bin"))}


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("sample") / "out")
    result = run(f"--input={FINEWEB_SAMPLE}", f"--out_dir={directory}", *SMALL)
    assert result.returncode == 0, result.stderr
    return directory


def test_fineweb_sample_round_trips(sample_dir):
    docs = pq.read_table(FINEWEB_SAMPLE).column("text").to_pylist()
    expected = np.concatenate([[data.EOT] + data.encode(d) for d in docs])
    names = ["local_val_000000.bin"] + [f"local_train_{i:06d}.bin" for i in range(1, 6)]
    assert sorted(shards(sample_dir)) == sorted(names)
    tokens = [data.read_shard(os.path.join(sample_dir, n)) for n in names]
    assert [len(t) for t in tokens[:-1]] == [5000] + [20000] * 4  # val first, then full train shards
    np.testing.assert_array_equal(np.concatenate(tokens), expected)


def test_shard_header_is_llm_c_format(sample_dir):
    path = os.path.join(sample_dir, "local_train_000001.bin")
    header = np.fromfile(path, dtype=np.int32, count=256)
    tokens = data.read_shard(path)
    # llm.c's magic, version and count; then the largest id + 1, in a slot llm.c leaves zero
    assert list(header[:4]) == [20240520, 1, 20000, int(tokens.max()) + 1] and not header[4:].any()
    assert os.path.getsize(path) == 256 * 4 + 20000 * 2


def test_tokenize_documents_puts_eot_before_each_document():
    tokens = data.tokenize_documents(["Hello world", "", "a job"])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [data.EOT, *data.encode("Hello world"), data.EOT, data.EOT, *data.encode("a job")]


def test_rerun_of_complete_output_does_nothing(sample_dir, tmp_path):
    directory = shutil.copytree(sample_dir, tmp_path / "copy")
    before = shards(directory)
    result = run(f"--input={FINEWEB_SAMPLE}", f"--out_dir={directory}", *SMALL)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert shards(directory) == before


# -----------------------------------------------------------------------------
# the toy corpus


def topics_in(doc, lists=toy_corpus.TOPICS):
    words = set(re.findall(r"[a-z]+", doc.lower()))
    return {topic for topic, vocabulary in lists.items() if words & set(vocabulary)}


def test_toy_corpus_is_deterministic_in_seed():
    assert toy_corpus.generate(50, seed=0) == toy_corpus.generate(50, seed=0)
    assert toy_corpus.generate(50, seed=0) != toy_corpus.generate(50, seed=1)


def test_toy_topic_words_are_distinct_single_tokens():
    assert len(toy_corpus.TOPICS) >= 6 and len(toy_corpus.TOPICS["work"]) >= 15
    assert toy_corpus.QUALITIES.keys() == toy_corpus.TOPICS.keys()
    words = [w for lists in (toy_corpus.TOPICS, toy_corpus.QUALITIES) for vocabulary in lists.values()
             for w in vocabulary]
    assert len(words) == len(set(words))  # no word belongs to two topics, or is both noun and adjective
    assert not set(words) & set(toy_corpus.ADJECTIVES + toy_corpus.NAMES)  # nor is a shared filler
    assert all(len(data.encode(" " + w)) == 1 for w in words)


def test_each_toy_document_stays_on_one_topic():
    docs = toy_corpus.generate(400, seed=3)
    assert all(topics_in(d) == topics_in(d, toy_corpus.QUALITIES) and len(topics_in(d)) == 1 for d in docs)
    assert set().union(*map(topics_in, docs)) == set(toy_corpus.TOPICS)  # every topic is used


def test_toy_corpus_size(tmp_path):
    result = run("--dataset=toy", f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    sizes = {name: len(data.read_shard(os.path.join(tmp_path, name))) for name in shards(tmp_path)}
    assert sizes["toy_val_000000.bin"] == 100_000
    assert 1_000_000 <= sum(sizes.values()) <= 3_000_000


# -----------------------------------------------------------------------------
# interruption: the process stops itself at a fixed shard, for real, so the test is not a race


STOPPER = """
import os, runpy, signal, sys
# Ctrl-C as a terminal delivers it: Python's own handler, even if the test process that started
# this one ignores SIGINT (a child inherits an ignored signal, and Python then leaves it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
signum, when, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rename = os.replace
def replace(src, dst):  # stop just before, or just after, the rename that completes `target`
    if os.path.basename(dst) == target and when == "before":
        os.kill(os.getpid(), signum)
    rename(src, dst)
    if os.path.basename(dst) == target and when == "after":
        os.kill(os.getpid(), signum)
os.replace = replace
sys.argv = [{prepare!r}] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory):
    """More documents than one tokenizer batch, so a resume skips whole documents too."""
    path = tmp_path_factory.mktemp("resume") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in toy_corpus.generate(2500, seed=5)))
    args = [f"--input={path}", "--val_tokens=5000", "--shard_size=10000"]
    reference = str(path.parent / "reference")
    assert run(*args, f"--out_dir={reference}").returncode == 0
    return args, shards(reference)


@pytest.mark.parametrize("signum, when", [(signal.SIGKILL, "before"), (signal.SIGKILL, "after"),
                                          (signal.SIGINT, "before")])
def test_interrupted_run_resumes_byte_identical(many_docs, tmp_path, signum, when):
    args, reference = many_docs
    stopped = run(str(int(signum)), when, "local_train_000012.bin", *args, f"--out_dir={tmp_path}",
                  script=STOPPER.format(prepare=os.path.join(HERE, "prepare.py")))
    if signum == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL
    else:  # Ctrl-C: a one-line message, no traceback
        assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
        assert stopped.stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert "local_train_000013.bin" not in shards(tmp_path)
    resumed = run(*args, f"--out_dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr
    assert shards(tmp_path) == reference
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    # it resumed after the 12 complete shards (val + 11 train) instead of starting over
    total = sum(len(b) - 1024 for b in reference.values()) // 2
    assert f"wrote {total - 5000 - 11 * 10000:,} tokens" in resumed.stdout


# -----------------------------------------------------------------------------
# bad input: a one-line error naming the culprit, a non-zero exit, no traceback, nothing written

BAD_INPUTS = {  # args, words the error must contain; {tmp} is the test's folder
    "no file": (["--input={tmp}/missing/*.parquet"], ["--input", "matches no file"]),
    "no text column": (["--input={tmp}/no_text.parquet"], ["no_text.parquet", "'text' column"]),
    "no text key": (["--input={tmp}/bad_line.jsonl"], ["bad_line.jsonl", "line 3"]),
    "unknown flag": (["--input=" + FINEWEB_SAMPLE, "--shard_sise=10"], ["--shard_sise"]),
    "wrong type": (["--input=" + FINEWEB_SAMPLE, "--shard_size=big"], ["--shard_size", "'big'"]),
    "negative size": (["--input=" + FINEWEB_SAMPLE, "--val_tokens=-5"], ["--val_tokens", "-5"]),
    "too small": (["--input=" + FINEWEB_SAMPLE], ["--val_tokens=10000000", "lower"]),
    "hub unreachable": (["--dataset=fineweb-edu"], ["--name=sample-10BT", "--dataset=toy"]),
}


def check_fails_cleanly(result, expected):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # (after a progress bar)
    assert errors == result.stderr.strip().splitlines()[-1:], result.stderr
    assert errors[0].startswith("error:") and all(e in errors[0] for e in expected), errors


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_cleanly(case, tmp_path):
    pq.write_table(pa.table({"content": ["a document"]}), tmp_path / "no_text.parquet")
    (tmp_path / "bad_line.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    args, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run(*[a.format(tmp=tmp_path) for a in args], f"--out_dir={out}", env={"HF_HUB_OFFLINE": "1"})
    check_fails_cleanly(result, expected)
    assert not out.exists() or not os.listdir(out)


def test_shards_of_other_settings_are_not_overwritten(sample_dir, tmp_path):
    directory = shutil.copytree(sample_dir, tmp_path / "existing")
    before = shards(directory)
    check_fails_cleanly(run(f"--input={FINEWEB_SAMPLE}", f"--out_dir={directory}", "--val_tokens=5000",
                            "--shard_size=30000"), ["--out_dir", "other settings"])
    assert shards(directory) == before


def test_unrecorded_shards_are_not_overwritten(tmp_path):
    foreign = tmp_path / "fineweb_train_000001.bin"  # e.g. shards downloaded for llm.c
    data.write_shard(foreign, np.arange(10))
    before = foreign.read_bytes()
    check_fails_cleanly(run(f"--input={FINEWEB_SAMPLE}", f"--out_dir={tmp_path}", *SMALL), ["--out_dir", ".bin"])
    assert shards(tmp_path) == {foreign.name: before}


def test_a_split_is_a_word_of_the_shard_name_not_any_part_of_it(tmp_path):
    for name in ("medieval_val_000000.bin", "medieval_train_000001.bin", "tiny_shakespeare_val.bin",
                 "fineweb-train-000002.bin"):
        data.write_shard(tmp_path / name, np.arange(3))
    names = lambda split: [os.path.basename(p) for p in data.shard_paths(str(tmp_path), split)]  # noqa: E731
    assert names("val") == ["medieval_val_000000.bin", "tiny_shakespeare_val.bin"]
    assert names("train") == ["fineweb-train-000002.bin", "medieval_train_000001.bin"]


def test_the_vocabulary_check_reads_the_header_not_every_token(tmp_path, monkeypatch):
    path = str(tmp_path / "x_train_000000.bin")
    data.write_shard(path, np.array([1, 700, 3]))
    monkeypatch.setattr(np.memmap, "max", lambda *a, **k: pytest.fail("read every token"))
    assert list(data.read_shard(path, 701)) == [1, 700, 3]
    with pytest.raises(SystemExit, match=r"holds token id 700, beyond the vocabulary size 700"):
        data.read_shard(path, 700)
