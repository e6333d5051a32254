""".ci/gpu, the prepared GPU check, run here as its CPU dry run: every step but the test suite, at tiny sizes."""
import json
import os
import subprocess
import sys

from conftest import ENV, HERE


def test_the_gpu_checks_dry_run_passes_every_step_and_summarises_it(gpu_dry_run):
    # the dry run itself started when the tests were collected (conftest.py), in a folder of its own
    out, returncode, output = gpu_dry_run
    assert returncode == 0, output[-2000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    steps = summary["steps"]
    assert list(steps) == ["prepare", "train_toy", "train_paper_shape", "bench_gpt2", "torchrun_stop",
                           "torchrun_resume", "sample", "steer"]
    assert all(s["rc"] == 0 for s in steps.values()) and all((out / f"{n}.log").exists() for n in steps)
    assert steps["train_paper_shape"]["last_iter"] == 30 and "val_loss" in steps["train_paper_shape"]
    assert steps["bench_gpt2"]["bench"]["device"] == "cpu"
    assert summary["resumed_loss_equals_uninterrupted"]


def test_the_gpu_check_refuses_an_unknown_option(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(HERE, ".ci", "gpu"), str(tmp_path), "--cpu-dryrun"],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and run.stderr.strip() == \
        ".ci/gpu: unknown option --cpu-dryrun (see the docstring at the top of .ci/gpu)"
    assert not any(tmp_path.iterdir())
