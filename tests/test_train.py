"""
train.py and sample.py, as a user runs them, and what makes training reliable:

    end to end       a tiny run logs, evaluates, writes resumable and series checkpoints; sample.py continues it
    crash safety     SIGKILL while ckpt.pt is being written leaves the previous ckpt.pt to resume from
    exact resume     N iterations then a resume for N more is the 2N-iteration run, bit for bit
    DDP              two gloo processes give the losses of one process accumulating the same batch
    fault tolerance  a rank killed under torchrun --max_restarts resumes to the uninterrupted weights
    security         every torch.load has weights_only=True; checkpoints hold tensors and plain values
    divergence       a NaN loss stops training and the last good checkpoint stays as it was, with no
                     read-back from the device at every step to see it

The runs compared are conftest.py's train_runs, built once and side by side.
"""
import ast
import glob
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, HERE, TRAIN, fingerprint, sha256
from toolkit import sparse_mlp
from toolkit.common import load_checkpoint


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


# -----------------------------------------------------------------------------
# end to end, on the uninterrupted run (4 iterations, alpha 1 -> 0 over the first 2)


def test_train_logs_loss_lr_alpha_and_throughput(reference):
    lines = [l for l in reference.stdout.splitlines() if l.startswith("iter ")]
    assert len(lines) == 4
    assert all(("loss" in l and "lr" in l and "alpha" in l and "tok/s" in l) for l in lines)
    assert "alpha 0.000" in lines[-1]  # annealed to sparse after half of the 4 iterations


def test_train_evaluates_val_loss_and_perplexity(reference):
    evals = [l for l in reference.stdout.splitlines() if l.startswith("step ")]
    assert [l.split(":")[0] for l in evals] == ["step 2", "step 4"]
    val, ppl = (float(evals[-1].split(s)[1].split(",")[0]) for s in ("val loss ", "val ppl "))
    assert ppl == pytest.approx(math.exp(val), rel=1e-3)


def test_train_writes_resumable_and_series_checkpoints(reference):
    files = sorted(os.listdir(reference.out))
    assert files == ["ckpt.pt", "ckpt_000000.pt", "ckpt_000002.pt", "ckpt_000004.pt"]
    ckpt = torch.load(reference.out / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= ckpt.keys()
    assert ckpt["iter_num"] == 4 and ckpt["model_args"]["topk"] == 8
    series = torch.load(reference.out / "ckpt_000002.pt", weights_only=True)
    assert series["iter_num"] == 2 and "optimizer" not in series


def test_sample_prints_continuations_of_the_prompt(reference, run_main):
    printed = run_main("sample.py", f"--out_dir={reference.out}", "--start=The office", "--num_samples=2",
                       "--max_new_tokens=8")
    samples = [s.strip() for s in printed.split("---------------") if s.strip()]
    assert len(samples) == 2 and all(s.startswith("The office") and len(s) > len("The office") for s in samples)


def test_sample_gives_the_same_text_with_the_cpu_fast_paths_off(reference, run_main, monkeypatch):
    calls, real = [], sparse_mlp.topk_mlp
    monkeypatch.setattr(sparse_mlp, "topk_mlp", lambda *a: calls.append(1) or real(*a))
    flags = (f"--out_dir={reference.out}", "--start=The office", "--num_samples=1", "--max_new_tokens=8",
             "--temperature=0")
    model_py_alone = run_main("sample.py", *flags, "--cpu_fast=False")
    assert calls == []
    assert run_main("sample.py", *flags) == model_py_alone and calls  # the fast path ran, to the same text


def test_training_with_the_cpu_fast_paths_off_runs_model_py_to_the_same_losses(data, run_main, monkeypatch, tmp_path):
    calls, real = [], sparse_mlp.topk_mlp
    monkeypatch.setattr(sparse_mlp, "topk_mlp", lambda *a: calls.append(1) or real(*a))
    flags = (*TRAIN, f"--data_dir={data}", "--annealing_schedule=step", "--max_iters=2", "--lr_decay_iters=2")
    model_py_alone = losses(run_main("train.py", *flags, f"--out_dir={tmp_path / 'a'}", "--cpu_fast=False"))
    assert calls == []
    assert losses(run_main("train.py", *flags, f"--out_dir={tmp_path / 'b'}")) == pytest.approx(model_py_alone, rel=1e-5)
    assert calls  # the fast path ran, to the same losses up to float rounding


def test_bfloat16_on_the_cpu_trains_under_autocast(reference, data, run_main, tmp_path):
    bf16 = losses(run_main("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--stop_iter=2",
                           "--dtype=bfloat16"))
    fp32 = {it: v for it, v in losses(reference.stdout).items() if it in bf16}  # the same run in float32
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)  # bf16's rounding, not another run
    assert load_checkpoint(str(tmp_path))["config"]["dtype"] == "bfloat16"


def test_help_lists_every_key_with_its_default(run_main):
    printed = run_main("train.py", "--help")  # and exits with status 0
    for key in ("--topk=64", "--n_nontopk=2", "--annealing_ratio=0.2", "--init_from='scratch'"):
        assert key in printed


# -----------------------------------------------------------------------------
# crash safety


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_to_resume_from(data, reference, train, tmp_path):
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
# exact resume: data order, dropout, alpha and learning rate follow from (seed, iteration),
# so a resumed run needs no saved RNG state


def test_n_iterations_then_resuming_for_n_more_is_the_2n_iteration_run_bit_for_bit(train_runs):
    split, whole = train_runs["stopped at 2, resumed"], train_runs["uninterrupted"]
    assert progress(split.stdout) == progress(whole.stdout)  # every loss, lr, alpha and evaluation
    for name in ("ckpt_000002.pt", "ckpt_000004.pt"):
        a, b = (torch.load(run.out / name, weights_only=True)["model"] for run in (split, whole))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert_same_training_state(split.out / "ckpt.pt", whole.out / "ckpt.pt")


def test_a_snapshot_lost_between_ckpt_pt_and_it_is_written_on_resume(reference, data, run_main, tmp_path):
    # iteration 2 writes ckpt.pt at its evaluation, then ckpt_000002.pt: a crash between the two
    # leaves ckpt.pt at 2 without its snapshot, and the resumed run starts from exactly that state
    run_main("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--stop_iter=2")
    os.remove(tmp_path / "ckpt_000002.pt")
    run_main("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume", "--stop_iter=3")
    a, b = (torch.load(out / "ckpt_000002.pt", weights_only=True)["model"] for out in (tmp_path, reference.out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_run_keeps_alpha_where_its_annealing_ended(reference, data, run_main, tmp_path):
    shutil.copy(reference.out / "ckpt.pt", tmp_path)  # 4 iterations, alpha 0 from iteration 2 on
    printed = run_main("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume",
                       "--max_iters=12", "--lr_decay_iters=12", "--stop_iter=6", "--eval_interval=100")
    alphas = [l.split("alpha ")[1].split(",")[0] for l in printed.splitlines() if l.startswith("iter ")]
    assert alphas == ["0.000", "0.000"]  # iterations 4 and 5; a span of 0.5 x 12 would give 0.333 and 0.167
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["anneal_span"] == 2


# -----------------------------------------------------------------------------
# DDP: with gradient_accumulation_steps=2, two processes take one micro-batch each, and dropout
# follows the micro-batch, not the process


def test_two_processes_give_the_losses_of_one_process_accumulating_the_same_batch(train_runs):
    two, one = train_runs["two processes"], train_runs["uninterrupted"]
    two_losses, one_losses = losses(two.stdout), losses(one.stdout)
    assert sorted(two_losses) == sorted(one_losses) == [1, 2, 3, 4]
    for it, loss in one_losses.items():
        assert abs(two_losses[it] - loss) <= 1e-5, (it, two_losses[it], loss)
    a, b = (torch.load(run.out / "ckpt.pt", weights_only=True)["model"] for run in (two, one))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_two_processes_share_the_evaluation_and_report_the_losses_of_one(train_runs):
    """eval_iters=3 batches on two ranks: rank 0 takes two, rank 1 one, and their sums are added."""
    two, one = train_runs["two processes"], train_runs["uninterrupted"]
    evals = lambda run: re.findall(r"^step \d+: .*$", run.stdout, re.M)
    assert len(evals(one)) == 2 and evals(two) == evals(one)
    best = [torch.load(run.out / "ckpt.pt", weights_only=True)["best_val_loss"] for run in (two, one)]
    assert abs(best[0] - best[1]) <= 1e-6, best


# -----------------------------------------------------------------------------
# fault tolerance: torchrun --max_restarts restarts every process of a job when one dies, and
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
    # evaluations, and so ckpt.pt, at 4, 8 and 12: the kill comes with 8 iterations still to go
    flags = [*TRAIN, f"--data_dir={data}", "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=4", "--ckpt_interval=0"]
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
    try:  # once the first checkpoint (iteration 4 of 12) is written, kill rank 1
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
    assert torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)["iter_num"] == 12


# -----------------------------------------------------------------------------
# security


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
    assert any(p == os.path.join("toolkit", "common.py") for p, _, _ in calls)  # the scan does see the checkpoint loader
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
# divergence


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data, reference, run_main, tmp_path):
    shutil.copy(reference.out / "ckpt.pt", tmp_path)
    good, before = sha256(tmp_path / "ckpt.pt"), fingerprint(tmp_path)
    # a learning rate of 1e6 without gradient clipping: the loss is NaN within a few steps; a
    # ckpt_{iter}.pt snapshot is due at every iteration, and none of a diverged model may be written
    with pytest.raises(SystemExit) as stopped:  # in this process; a die() is one line and status 1 (test_errors.py)
        run_main("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume",
                 "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=100", "--ckpt_interval=1",
                 "--learning_rate=1e6", "--min_lr=1e6", "--grad_clip=0")
    error = str(stopped.value.code)
    failed = re.match(r"error: the loss was nan or inf at iteration (\d+); stopping without saving", error)
    assert failed and "\n" not in error, error
    assert f"The last good checkpoint is in {tmp_path}" in error
    assert sha256(tmp_path / "ckpt.pt") == good
    snapshots = sorted(glob.glob(str(tmp_path / "ckpt_*.pt")))
    # from the resumed state (4: only its ckpt.pt was copied here) to the last before the NaN
    assert [os.path.basename(p) for p in snapshots] == [f"ckpt_{i:06d}.pt" for i in range(4, int(failed[1]))]
    for path in snapshots:  # the models before the failing iteration, none after it
        assert all(torch.isfinite(w).all() for w in torch.load(path, weights_only=True)["model"].values()), path
    assert {k: v for k, v in fingerprint(tmp_path).items() if not k.startswith("ckpt_")} == before


def test_the_loss_is_not_read_back_from_the_device_at_every_step(data, run_main, tmp_path, monkeypatch):
    # a read of a tensor's value (item, float, bool, tolist) waits for the GPU to finish its queue;
    # counted where train.py makes it, runs of 3 and of 9 steps must make the same number
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            if os.path.basename(sys._getframe(1).f_code.co_filename) == "train.py":
                reads.append(name)
            return original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, read)
    for name in ("item", "__float__", "__bool__", "tolist"):
        counted(name)
    counts = []
    for steps in (3, 9):
        reads.clear()
        run_main("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path / str(steps)}", f"--max_iters={steps}",
                 f"--lr_decay_iters={steps}", "--eval_interval=100", "--log_interval=100", "--ckpt_interval=0")
        counts.append(len(reads))
    assert counts[0] == counts[1] and counts[0] > 0, counts  # the final evaluation's reads, and no more


def test_a_nan_loss_between_two_reads_is_found_at_the_next(data, reference, run_main, tmp_path):
    shutil.copy(reference.out / "ckpt.pt", tmp_path)
    good = sha256(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"the loss was nan or inf at one of iterations 4-7; stopping without saving"):
        run_main("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume",
                 "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=100", "--log_interval=4", "--ckpt_interval=0",
                 "--learning_rate=1e6", "--min_lr=1e6", "--grad_clip=0")
    assert sha256(tmp_path / "ckpt.pt") == good
