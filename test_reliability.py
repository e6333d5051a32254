"""
Reliability: interrupted runs lose nothing and nothing goes wrong silently.

    crash safety     SIGKILL while ckpt.pt is being written leaves the previous ckpt.pt to resume from
    exact resume     N iterations then a resume for N more is the 2N-iteration run, bit for bit
    DDP              two gloo processes give the losses of one process accumulating the same batch
    bad input        a one-line error naming the flag, file or value, exit 1, nothing overwritten
    security         every torch.load has weights_only=True; checkpoints hold tensors and plain values
    divergence       a NaN loss stops training and the last good checkpoint stays as it was

(prepare.py interrupted and run again is tested in test_prepare.py.) Every training run here is one
tiny configuration: each subprocess costs about 2 s of importing torch, so runs are shared where
they can be, and the command-line rows of the bad-input table run side by side.
"""
import ast
import collections
import concurrent.futures
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import VOCAB_SIZE, encode_prompt, load_checkpoint, read_shard, shard_paths, write_shard

HERE = os.path.dirname(os.path.abspath(__file__))
# one thread per process: these runs are too small to gain from more, and on a busy 2-core machine
# threads waiting for each other make them several times slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# 4 iterations of 2 micro-batches; dropout on and alpha annealing over iterations 0-2, so exact resume
# and DDP cover both; ckpt.pt is saved at iterations 2 and 4, the ckpt_{iter}.pt series at 0, 2, 4
TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
         "--gradient_accumulation_steps=2", "--topk=8", "--n_nontopk=1", "--dropout=0.1",
         "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--ckpt_interval=2",
         "--warmup_iters=1", "--lr_decay_iters=4", "--annealing_ratio=0.5", "--learning_rate=1e-3",
         "--device=cpu", "--dtype=float32", "--compile=False"]


def run(script, *args, launcher=(sys.executable,), cwd=HERE):
    return subprocess.run([*launcher, os.path.join(HERE, script), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def train(data, out, *flags, launcher=(sys.executable,)):
    result = run("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={out}", *flags, launcher=launcher)
    assert result.returncode == 0, result.stderr
    return result.stdout


def progress(stdout):
    """The log and evaluation lines, without their timing: what a reproduced run must repeat."""
    return [re.sub(r", [\d,.]+ tok/s.*", "", line) for line in stdout.splitlines()
            if line.startswith(("iter ", "step "))]


def losses(stdout):
    return {int(it): float(loss) for it, loss in re.findall(r"^iter (\d+): loss ([^,]+),", stdout, re.M)}


def leaves(obj, path=""):
    """(path, value) for every value inside nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}/{i}")
    else:
        yield path, obj


def assert_same_training_state(path_a, path_b):
    """The model, optimizer and counters in two checkpoints are equal bit for bit."""
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    for key in ("model", "optimizer", "iter_num", "best_val_loss"):
        la, lb = dict(leaves(a[key])), dict(leaves(b[key]))
        assert la.keys() == lb.keys(), key
        for name, va in la.items():
            vb = lb[name]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
            assert same, f"{key}{name} differs"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprint(folder):
    """Every folder and file below folder, files with their size, inode, modification time and
    contents: a file written, replaced, created or removed, or a folder created or removed,
    changes it."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = "folder"
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_ino, st.st_mtime_ns, sha256(path))
    return out


def write_data(folder, train_tokens=3000, val_tokens=1000):
    """Random token ids (the model has nothing to learn; these tests are about the machinery)."""
    rng = np.random.default_rng(0)
    write_shard(os.path.join(folder, "tiny_val_000000.bin"), rng.integers(0, 50257, val_tokens))
    write_shard(os.path.join(folder, "tiny_train_000001.bin"), rng.integers(0, 50257, train_tokens))
    write_shard(os.path.join(folder, "tiny_train_000002.bin"), rng.integers(0, 50257, train_tokens // 2))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp("data")))


Run = collections.namedtuple("Run", "stdout out")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The runs the tests compare, each in its own out_dir, started side by side (they are
    independent, and each spends seconds importing torch): {name: Run}."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    jobs = {
        "uninterrupted": lambda out: train(data, out),
        "stopped at 2, resumed": lambda out: train(data, out, "--stop_iter=2") + train(data, out, "--init_from=resume"),
        "two processes": lambda out: train(data, out, launcher=torchrun),
    }
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        outs = {name: tmp_path_factory.mktemp("run") for name in jobs}
        futures = {name: pool.submit(job, outs[name]) for name, job in jobs.items()}
        return {name: Run(future.result(), outs[name]) for name, future in futures.items()}


@pytest.fixture(scope="module")
def reference(runs):
    """The uninterrupted single-process run."""
    return runs["uninterrupted"]


# -----------------------------------------------------------------------------
# 1. crash safety


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_to_resume_from(data, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TRAIN, f"--data_dir={data}",
                             f"--out_dir={out}"], cwd=HERE, env=ENV, stdout=subprocess.DEVNULL)
    # at iteration 2 ckpt.pt is saved, then the ckpt_000002.pt snapshot; at 4 ckpt.pt again: kill
    # the process once that second save of ckpt.pt has begun writing its temporary file, before
    # the rename that would replace the first
    def second_save_writing():
        for tmp in glob.glob(str(out / ".tmp_ckpt.pt*")) if (out / "ckpt_000002.pt").exists() else []:
            try:
                if os.path.getsize(tmp) > 0:
                    return True
            except FileNotFoundError:  # renamed onto ckpt.pt in the meantime
                pass
        return False

    try:
        deadline = time.time() + 120
        while not second_save_writing():
            assert proc.poll() is None, "train.py ended before its second save could be interrupted"
            assert time.time() < deadline
            time.sleep(0.001)
    finally:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert glob.glob(str(out / ".tmp_ckpt.pt*")), "killed after the write had finished: nothing was tested"

    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2  # the previous checkpoint
    resumed = train(data, out, "--init_from=resume")
    assert progress(resumed) == progress(reference.stdout)[3:]  # iterations 3 and 4, evaluation at 4
    assert_same_training_state(out / "ckpt.pt", reference.out / "ckpt.pt")
    assert not glob.glob(str(out / ".tmp*")), "the killed run's temporary file was not cleaned up"


# -----------------------------------------------------------------------------
# 2. exact resume: data order, dropout, alpha and learning rate follow from (seed, iteration),
# so a resumed run needs no saved RNG state


def test_n_iterations_then_resuming_for_n_more_is_the_2n_iteration_run_bit_for_bit(runs):
    split, whole = runs["stopped at 2, resumed"], runs["uninterrupted"]
    assert progress(split.stdout) == progress(whole.stdout)  # every loss, lr, alpha and evaluation
    for name in ("ckpt_000002.pt", "ckpt_000004.pt"):
        a, b = (torch.load(run.out / name, weights_only=True)["model"] for run in (split, whole))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert_same_training_state(split.out / "ckpt.pt", whole.out / "ckpt.pt")


# -----------------------------------------------------------------------------
# 3. DDP: with gradient_accumulation_steps=2, two processes take one micro-batch each, and dropout
# follows the micro-batch, not the process


def test_two_processes_give_the_losses_of_one_process_accumulating_the_same_batch(runs):
    two, one = runs["two processes"], runs["uninterrupted"]
    two_losses, one_losses = losses(two.stdout), losses(one.stdout)
    assert sorted(two_losses) == sorted(one_losses) == [1, 2, 3, 4]
    for it, loss in one_losses.items():
        assert abs(two_losses[it] - loss) <= 1e-5, (it, two_losses[it], loss)
    a, b = (torch.load(run.out / "ckpt.pt", weights_only=True)["model"] for run in (two, one))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


# -----------------------------------------------------------------------------
# 4. fault tolerance: torchrun --max_restarts restarts every process of a job when one dies, and
# with --init_from=auto they resume from out_dir/ckpt.pt


def worker_pids(launcher_pid):
    """{RANK: pid} of the processes a torchrun launcher started."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    ranks = {}
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except FileNotFoundError:  # ended in the meantime
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def test_a_rank_killed_under_torchrun_max_restarts_resumes_to_the_uninterrupted_weights(data, reference, tmp_path):
    flags = [*TRAIN, f"--data_dir={data}", "--max_iters=30", "--lr_decay_iters=30", "--ckpt_interval=0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as README says (pytorch/pytorch#135712)
    # the uninterrupted job goes into a folder holding another run, which --overwrite=True replaces
    # (a resume of that run would end with other weights), its ckpt_*.pt series included
    (tmp_path / "whole").mkdir()
    shutil.copy(reference.out / "ckpt.pt", tmp_path / "whole")
    shutil.copy(reference.out / "ckpt_000002.pt", tmp_path / "whole")
    whole = subprocess.Popen([*torchrun, os.path.join(HERE, "train.py"), *flags, f"--out_dir={tmp_path / 'whole'}",
                              "--overwrite=True"], cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    crashed = subprocess.Popen([*torchrun, "--max_restarts=1", os.path.join(HERE, "train.py"), *flags,
                                f"--out_dir={tmp_path / 'crashed'}", "--init_from=auto"],
                               cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # once the first checkpoint (iteration 2 of 30) is written, kill rank 1
        deadline = time.time() + 120
        while not (tmp_path / "crashed" / "ckpt.pt").exists():
            assert crashed.poll() is None and time.time() < deadline, "the job ended before it could be killed"
            time.sleep(0.01)
        os.kill(worker_pids(crashed.pid)[1], signal.SIGKILL)
        stdout, stderr = crashed.communicate(timeout=240)
        _, whole_stderr = whole.communicate(timeout=240)
    finally:
        for job in (crashed, whole):  # on a failure: the launcher, which takes its processes with it
            if job.poll() is None:
                job.terminate()
                job.wait(timeout=60)
    assert crashed.returncode == 0, stderr
    assert stdout.count("tokens per iteration") == 2, "the job was not restarted"  # printed at each start
    assert whole.returncode == 0, whole_stderr
    assert not glob.glob(str(tmp_path / "whole" / "ckpt_*.pt"))  # the replaced run's series is gone
    assert_same_training_state(tmp_path / "crashed" / "ckpt.pt", tmp_path / "whole" / "ckpt.pt")
    assert torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)["iter_num"] == 30


# -----------------------------------------------------------------------------
# 5. bad input: one line on stderr naming the flag, file or value, exit status 1, no traceback,
# and nothing already on disk touched. The table has two parts: rows that need a script's command
# line, and rows met by one function call that the scripts make (configurator.die's SystemExit
# is what prints the line and sets the exit status, as the first part shows).

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
    ("topk larger than d_ff", "train.py", ["--topk=129"], "topk must be in [0, d_ff = 4 * n_embd = 128], got 129"),
    ("sae.py without the TopK run", "sae.py", ["--out_dir={d}/run"], "give --compare=OUT_DIR of the TopK run"),
    ("a --dictionary that is not one", "analysis.py", ["--out_dir={d}/run", "--dictionary={d}/run/ckpt.pt"],
     "{d}/run/ckpt.pt is not a dictionary written by sae.py"),
    ("max_new_tokens below 1", "sample.py", ["--out_dir={d}/run", "--max_new_tokens=0"],
     "--max_new_tokens must be at least 1, got 0"),
    ("--input matching no file", "prepare.py", ["--input={d}/*.jsonl", "--out_dir={d}/prepared"],
     "--input='{d}/*.jsonl' matches no file"),
    ("--input without a text column", "prepare.py", ["--input={d}/no_text.parquet", "--out_dir={d}/prepared"],
     "--input file {d}/no_text.parquet has no 'text' column"),
]


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
    elif name == "no_text.parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": ["a document in the wrong column"]}), path)


@pytest.fixture(scope="module")
def command_line_results(reference, tmp_path_factory):
    """{row: (result, folder, fingerprint before, fingerprint after)}, the rows run four at a time."""
    def run_row(row_and_folder):
        (name, script, args, _), d = row_and_folder
        if script == "train.py":
            args = [*TRAIN, "--data_dir={d}/data", "--out_dir={d}/out", *args]
        for name_of_input in set(re.findall(r"\{d\}/([\w.]+)", " ".join(args))):
            make_input(d, name_of_input, reference.out)
        before = fingerprint(d)
        result = run(script, *(a.format(d=d) for a in args), cwd=d)
        return name, (result, d, before, fingerprint(d))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        folders = [tmp_path_factory.mktemp("bad_input") for _ in COMMAND_LINE_TABLE]
        return dict(pool.map(run_row, zip(COMMAND_LINE_TABLE, folders)))


@pytest.mark.parametrize("row", COMMAND_LINE_TABLE, ids=[row[0] for row in COMMAND_LINE_TABLE])
def test_bad_command_line_input_fails_in_one_line_and_touches_nothing(command_line_results, row):
    result, d, before, after = command_line_results[row[0]]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert row[3].format(d=d) in lines[0]
    assert after == before  # nothing created, replaced or written over


def truncated_shard(path):
    write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)


def foreign_shard(path):  # e.g. a raw uint16 token dump without the llm.c header
    np.arange(1000, dtype=np.uint16).tofile(path)


def corrupted_checkpoint(path):  # cut short, as by a full disk under a non-atomic write
    torch.save({"model": {"w": torch.ones(10_000)}, "model_args": {}}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# (row, make the bad input at path, what meets it, what the error says)
CALL_TABLE = [
    ("missing data_dir", lambda p: None, lambda p: shard_paths(p, "train"), "data_dir '{path}' does not exist"),
    ("empty data_dir", os.makedirs, lambda p: shard_paths(p, "train"),
     "no train shards (*train*.bin) in data_dir '{path}'"),
    ("truncated shard", truncated_shard, read_shard, "{path} is truncated or padded: header says 100 tokens"),
    ("shard with a foreign header", foreign_shard, read_shard, "{path} is not a token shard (bad magic number"),
    ("shard with token ids beyond the vocabulary", lambda p: write_shard(p, [1, 2, 60000]),
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


# -----------------------------------------------------------------------------
# 6. security


def test_every_torch_load_in_the_repository_passes_weights_only_true():
    calls = []
    for path in glob.glob(os.path.join(HERE, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((os.path.relpath(path, HERE), node.lineno, safe))
    assert any(p == "common.py" for p, _, _ in calls)  # the scan does see the checkpoint loader
    assert [c for c in calls if not c[2]] == []


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")

    class Payload:  # unpickling it would call os.remove(canary)
        def __reduce__(self):
            return os.remove, (str(canary),)

    torch.save({"model": Payload(), "model_args": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="is not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert canary.read_text() == "still here"


def test_checkpoints_hold_only_tensors_and_plain_python_values(reference):
    plain = (torch.Tensor, str, int, float, bool, type(None))
    paths = sorted(glob.glob(str(reference.out / "*.pt")))
    assert [os.path.basename(p) for p in paths] == ["ckpt.pt", "ckpt_000000.pt", "ckpt_000002.pt", "ckpt_000004.pt"]
    for path in paths:
        for name, value in leaves(torch.load(path, weights_only=True)):
            assert isinstance(value, plain), f"{path}: {name} is a {type(value).__name__}"


# -----------------------------------------------------------------------------
# 7. divergence


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data, reference, tmp_path):
    shutil.copy(reference.out / "ckpt.pt", tmp_path)
    good, before = sha256(tmp_path / "ckpt.pt"), fingerprint(tmp_path)
    # a learning rate of 1e6 without gradient clipping: the loss is NaN within a few steps; a
    # ckpt_{iter}.pt snapshot is due at every iteration, and none of a diverged model may be written
    result = run("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume",
                 "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=100", "--ckpt_interval=1",
                 "--learning_rate=1e6", "--min_lr=1e6", "--grad_clip=0")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    failed = re.match(r"error: loss is (nan|-?inf) at iteration (\d+); stopping without saving", lines[0])
    assert len(lines) == 1 and failed, result.stderr
    assert f"The last good checkpoint is in {tmp_path}" in lines[0]
    assert sha256(tmp_path / "ckpt.pt") == good
    snapshots = sorted(glob.glob(str(tmp_path / "ckpt_*.pt")))
    assert [os.path.basename(p) for p in snapshots] == [f"ckpt_{i:06d}.pt" for i in range(5, int(failed[2]))]
    for path in snapshots:  # the models before the failing iteration, none after it
        assert all(torch.isfinite(w).all() for w in torch.load(path, weights_only=True)["model"].values()), path
    assert {k: v for k, v in fingerprint(tmp_path).items() if not k.startswith("ckpt_")} == before
