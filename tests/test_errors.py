"""
Bad input: one line on stderr naming the flag, file or value, exit status 1, no traceback, and
nothing already on disk touched, for every script (prepare.py's own inputs: test_prepare.py).
"""
import json
import os
import re
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TRAIN, fingerprint, write_data
from model import GPT, GPTConfig
from toolkit.common import load_checkpoint, save_checkpoint
from toolkit.data import VOCAB_SIZE, encode_prompt, read_shard, shard_paths, write_shard


# The table has two parts: rows that need a script's command line, and rows met by one function
# call that the scripts make. Both run in this process: configurator.die's SystemExit is what
# prints the line and sets the exit status, as one row run as a real process shows.

# (row, script, arguments, what the error line says); {d} is the row's own folder, where the inputs
# named {d}/NAME are made by make_input(NAME); train.py rows also get TRAIN, --data_dir={d}/data
# and --out_dir={d}/out before their own arguments
COMMAND_LINE_TABLE = [
    ("unknown flag", "train.py", ["--nonsense=1"], "unknown flag --nonsense"),
    ("value of the wrong type", "train.py", ["--batch_size=two"], "--batch_size expects int, got 'two'"),
    ("block_size larger than a shard", "train.py", ["--data_dir={d}/short"],
     "--block_size=32 needs shards longer than it, but the longest train shard in {d}/short has 20 tokens"),
    ("resume without a checkpoint", "train.py", ["--init_from=resume"], "no checkpoint at {d}/out/ckpt.pt"),
    ("scratch into a folder holding a run", "train.py", ["--out_dir={d}/run"],
     "{d}/run already holds a run (ckpt.pt); continue it with --init_from=resume"),
    ("resume with another model shape", "train.py", ["--init_from=resume", "--out_dir={d}/run", "--n_embd=64"],
     "--n_embd=64 differs from the checkpoint's n_embd=32 in {d}/run/ckpt.pt"),
    ("resume from a model-only snapshot", "train.py", ["--init_from=resume", "--out_dir={d}/snapshot"],
     "{d}/snapshot/ckpt.pt cannot be resumed from: it has no best_val_loss, optimizer"),
    ("init_from weights of another shape", "train.py", ["--init_from={d}/run/ckpt.pt", "--n_embd=64"],
     "--n_embd=64 differs from n_embd=32 of the weights in {d}/run/ckpt.pt (their shape: --n_layer=2 --n_head=2 --n_embd=32 --bias=True)"),
    ("block_size beyond the weights' positions", "train.py", ["--init_from={d}/run", "--block_size=64"],
     "--block_size=64 exceeds the 32 positions of the weights in {d}/run"),
    ("init_from naming no weights", "train.py", ["--init_from={d}/nothing"],
     "--init_from='{d}/nothing' is not 'scratch', 'resume', 'auto', one of gpt2, gpt2-medium"),
    ("resume with another annealing schedule", "train.py",
     ["--init_from=resume", "--out_dir={d}/run", "--annealing_schedule=cosine"],
     "--annealing_schedule='cosine' differs from the checkpoint's annealing_schedule='linear' in {d}/run/ckpt.pt"),
    ("init_from a checkpoint that --overwrite would remove", "train.py",
     ["--init_from={d}/run/ckpt.pt", "--out_dir={d}/run", "--overwrite=True"],
     "--init_from={d}/run/ckpt.pt is a checkpoint of --out_dir={d}/run, whose ckpt*.pt files --overwrite=True removes"),
    ("init_from a damaged transformers folder", "train.py", ["--init_from={d}/damaged_gpt2"],
     "--init_from={d}/damaged_gpt2: cannot read the GPT-2 in {d}/damaged_gpt2 (JSONDecodeError"),
    ("init_from a transformers folder missing tensors", "train.py", ["--init_from={d}/partial_gpt2"],
     "the weights of {d}/partial_gpt2 do not fit the model: Error(s) in loading state_dict for GPT: Missing key(s)"),
    ("init_from weights with fewer tokens than the shards", "train.py", ["--init_from={d}/small_vocab"],
     "beyond the vocabulary size 512"),
    ("unknown annealing schedule", "train.py", ["--annealing_schedule=exp"],
     "--annealing_schedule must be one of linear, cosine, step, got 'exp'"),
    ("eval_interval of zero", "train.py", ["--eval_interval=0"], "--eval_interval must be at least 1, got 0"),
    ("eval_iters of zero", "train.py", ["--eval_iters=0"], "--eval_iters must be at least 1, got 0"),
    ("log_interval of zero", "train.py", ["--log_interval=0"], "--log_interval must be at least 1, got 0"),
    ("batch_size of zero", "train.py", ["--batch_size=0"], "--batch_size must be at least 1, got 0"),
    ("no micro-batches", "train.py", ["--gradient_accumulation_steps=0"],
     "--gradient_accumulation_steps must be at least 1, got 0"),
    ("negative max_iters", "train.py", ["--max_iters=-5"], "--max_iters must be at least 0, got -5"),
    ("negative seed", "train.py", ["--seed=-1"], "--seed must be at least 0, got -1"),
    ("negative learning rate", "train.py", ["--learning_rate=-1.0"], "--learning_rate must be at least 0, got -1.0"),
    ("annealing that never ends", "train.py", ["--annealing_ratio=2.0"],
     "--annealing_ratio must be between 0 and 1, got 2.0"),
    ("beta2 of one or more", "train.py", ["--beta2=1.5"], "--beta2 must be at least 0 and below 1, got 1.5"),
    ("out_dir that is a file", "train.py", ["--out_dir={d}/no_text.parquet"],
     "--out_dir={d}/no_text.parquet is a file, not a folder"),
    ("unknown device", "train.py", ["--device=tpu"], "--device=tpu is not one of auto, cuda, mps, cpu (optionally with :INDEX)"),
    ("a device this machine lacks", "train.py", ["--device=mps"],
     "--device=mps, but torch finds no such device here (--device=auto takes what there is)"),
    ("float16 on the CPU", "train.py", ["--dtype=float16"], "--dtype=float16 is not supported on cpu; use float32 or bfloat16"),
    ("topk larger than d_ff", "train.py", ["--topk=129"], "topk must be in [0, d_ff = 4 * n_embd = 128], got 129"),
    ("sae.py without the TopK run", "toolkit.sae", ["--out_dir={d}/run"], "give --compare=OUT_DIR of the TopK run"),
    ("a --dictionary that is not one", "toolkit.analysis", ["--out_dir={d}/run", "--dictionary={d}/run/ckpt.pt"],
     "{d}/run/ckpt.pt is not a dictionary written by sae.py"),
    ("max_new_tokens below 1", "sample.py", ["--out_dir={d}/run", "--max_new_tokens=0"],
     "--max_new_tokens must be at least 1, got 0"),
    ("no semantic clusters", "toolkit.analysis", ["--out_dir={d}/run", "--neuron=0:1", "--n_clusters=0"],
     "--n_clusters must be at least 1, got 0"),
    ("entropy of a neuron the model lacks", "toolkit.entropy", ["--out_dir={d}/run", "--neuron=9:0"],
     "--neuron: layer 9 out of range [0, 1]"),
    ("entropy compared with a run of another depth", "toolkit.entropy", ["--out_dir={d}/run", "--compare={d}/shallow"],
     "--compare={d}/shallow has 1 layers, --out_dir={d}/run 2: they must match"),
    ("a negative number of neurons to check", "toolkit.trace", ["--out_dir={d}/run", "--check_nodes=-3"],
     "--check_nodes must be at least 0, got -3"),
    ("no samples", "sample.py", ["--out_dir={d}/run", "--num_samples=-1"], "--num_samples must be at least 1, got -1"),
    ("negative top_k", "sample.py", ["--out_dir={d}/run", "--top_k=-1"], "--top_k must be at least 0, got -1"),
    ("--input matching no file", "prepare.py", ["--input={d}/*.jsonl", "--out_dir={d}/prepared"],
     "--input='{d}/*.jsonl' matches no file"),
    ("--input without a text column", "prepare.py", ["--input={d}/no_text.parquet", "--out_dir={d}/prepared"],
     "--input file {d}/no_text.parquet has no 'text' column"),
]


def gpt2_folder(path, safetensors):
    """A transformers GPT-2 folder of TRAIN's shape: its config.json, and model.safetensors's bytes."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=32), f)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(safetensors)


def make_input(d, name, finished_run):
    """Make {d}/name as a row's arguments name it; other names (an out_dir, a folder that must
    not exist) are left absent."""
    path = os.path.join(d, name)
    if name == "data":
        write_data(path)
    elif name == "short":  # shards shorter than block_size
        write_data(path, train_tokens=20, val_tokens=20)
    elif name == "run":  # a finished run
        os.makedirs(path)
        shutil.copy(finished_run / "ckpt.pt", path)
    elif name == "snapshot":  # a ckpt_{iter}.pt (model only) copied over ckpt.pt
        os.makedirs(path)
        shutil.copy(finished_run / "ckpt_000002.pt", os.path.join(path, "ckpt.pt"))
    elif name == "damaged_gpt2":  # a transformers folder whose safetensors header is cut short
        gpt2_folder(path, (64).to_bytes(8, "little") + b'{"wte.weight": ')
    elif name == "partial_gpt2":  # a well-formed safetensors file holding wte alone
        wte = np.zeros((50257, 32), np.float32)
        header = json.dumps({"wte.weight": dict(dtype="F32", shape=list(wte.shape), data_offsets=[0, wte.nbytes])}).encode()
        gpt2_folder(path, len(header).to_bytes(8, "little") + header + wte.tobytes())
    elif name in ("small_vocab", "shallow"):  # a run's weights with a vocabulary of 512, below the shards'
        # token ids; or one layer shallower
        change = dict(vocab_size=512) if name == "small_vocab" else dict(n_layer=1)
        args = dict(load_checkpoint(str(finished_run))["model_args"], **change)
        os.makedirs(path)
        save_checkpoint(dict(model=GPT(GPTConfig(**args)).state_dict(), model_args=args, iter_num=0, config={}),
                        os.path.join(path, "ckpt.pt"))
    elif name == "no_text.parquet":
        pq.write_table(pa.table({"body": ["a document in the wrong column"]}), path)


def command_line(row, d, finished_run):
    """The row's arguments, its inputs made in folder d."""
    _, script, args, _ = row
    if script == "train.py":
        args = [*TRAIN, "--data_dir={d}/data", "--out_dir={d}/out", *args]
    for name_of_input in set(re.findall(r"\{d\}/([\w.]+)", " ".join(args))):
        make_input(d, name_of_input, finished_run)
    return [a.format(d=d) for a in args]


@pytest.mark.parametrize("row", COMMAND_LINE_TABLE, ids=[row[0] for row in COMMAND_LINE_TABLE])
def test_bad_command_line_input_fails_in_one_line_and_touches_nothing(row, reference, run_main, tmp_path,
                                                                      monkeypatch, capsys):
    # in this process, to save an interpreter start per row: die()'s SystemExit is what a real
    # process prints as its last line and turns into exit status 1 (the next test runs one row so)
    args = command_line(row, tmp_path, reference.out)
    monkeypatch.chdir(tmp_path)
    before = fingerprint(tmp_path)
    with pytest.raises(SystemExit) as e, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")  # a real process would print each on stderr
        run_main(row[1], *args)
    error = str(e.value.code)
    assert error.startswith("error: ") and "\n" not in error and row[3].format(d=tmp_path) in error
    assert capsys.readouterr().err == "" and not warned  # nothing else on stderr
    assert fingerprint(tmp_path) == before  # nothing created, replaced or written over


def test_a_bad_command_line_ends_the_process_with_one_line_on_stderr_and_status_1(reference, run, tmp_path):
    row = next(r for r in COMMAND_LINE_TABLE if r[0] == "resume with another model shape")
    result = run(row[1], *command_line(row, tmp_path, reference.out), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: " + row[3].format(d=tmp_path))


def truncated_shard(path):
    write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)


def foreign_shard(path):  # e.g. a raw uint16 token dump without the llm.c header
    np.arange(1000, dtype=np.uint16).tofile(path)


def unrecorded_shard(path):  # as llm.c writes one: no largest id in the header, so every token is read
    write_shard(path, [1, 2, 60000])
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(np.zeros(1, dtype=np.int32).tobytes())


def corrupted_checkpoint(path):  # cut short, as by a full disk under a non-atomic write
    torch.save({"model": {"w": torch.ones(10_000)}, "model_args": {}}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# (row, make the bad input at path, what meets it, what the error says)
CALL_TABLE = [
    ("missing data_dir", lambda p: None, lambda p: shard_paths(p, "train"), "data_dir '{path}' does not exist"),
    ("empty data_dir", os.makedirs, lambda p: shard_paths(p, "train"),
     "no train shards (NAME_train_000000.bin) in data_dir '{path}'"),
    ("truncated shard", truncated_shard, read_shard, "{path} is truncated or padded: header says 100 tokens"),
    ("shard with a foreign header", foreign_shard, read_shard, "{path} is not a token shard (bad magic number"),
    ("shard with token ids beyond the vocabulary", lambda p: write_shard(p, [1, 2, 60000]),
     lambda p: read_shard(p, VOCAB_SIZE), "{path} holds token id 60000, beyond the vocabulary size 50304"),
    ("shard of another writer with token ids beyond the vocabulary", unrecorded_shard,
     lambda p: read_shard(p, VOCAB_SIZE), "{path} holds token id 60000, beyond the vocabulary size 50304"),
    ("corrupted checkpoint", corrupted_checkpoint, load_checkpoint, "{path} is not a readable checkpoint"),
    ("foreign checkpoint", lambda p: torch.save({"weights": torch.ones(3)}, p), load_checkpoint,
     "{path} is not a TopK LM checkpoint"),
    ("checkpoint of a whole pickled module", lambda p: torch.save(torch.nn.Linear(2, 2), p), load_checkpoint,
     "{path} is not a readable checkpoint (UnpicklingError"),
    ("empty prompt", lambda p: None, lambda p: encode_prompt(" \n"), "--start is empty"),
]


@pytest.mark.parametrize("make, meet, message", [row[1:] for row in CALL_TABLE], ids=[row[0] for row in CALL_TABLE])
def test_bad_input_met_by_a_call_fails_in_one_line_and_touches_nothing(tmp_path, make, meet, message):
    path = str(tmp_path / "input")
    make(path)
    before = fingerprint(tmp_path)
    with pytest.raises(SystemExit) as e:
        meet(path)
    error = str(e.value.code)
    assert error.startswith("error: ") and "\n" not in error
    assert message.format(path=path) in error
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize('bad', ['--layer=3', '--neuron=128', '--neuron=-1', '--prompts=The| ', '--max_new_tokens=0',
                                 '--scales=1,x', '--scales=0', '--scales=-1,2', '--refine=-1', '--top_m=0',
                                 '--batch_size=0', '--temperature=-1', '--top_k=-5', '--eval_tokens=10'])
def test_steer_rejects_bad_flags_in_one_line(tiny_runs, run_main, bad):
    # in this process, to save an interpreter start per case; die() raises SystemExit
    with pytest.raises(SystemExit) as e:
        run_main('steer.py', f'--out_dir={tiny_runs / "topk"}', '--layer=0', '--neuron=1', bad)
    message = str(e.value)
    assert message.startswith(f"error: {bad.split('=')[0]}") and '\n' not in message, message
    if 'layer' in bad or 'neuron' in bad:
        assert ('[0, 2]' if 'layer' in bad else '[0, 127]') in message  # the valid range


def test_a_concept_absent_from_the_evaluation_tokens_says_how_to_search_further(tiny_runs, run_main):
    with pytest.raises(SystemExit) as e:
        run_main('steer.py', f'--out_dir={tiny_runs / "topk"}', '--concept=piano rain', '--eval_tokens=1024')
    message = str(e.value)
    assert message.startswith("error: --concept: no concept token ('rain', ' rain', ' Rain', ' piano', 'Rain', ' Piano') in the 1,024 ")
    assert '--eval_tokens' in message and '\n' not in message
