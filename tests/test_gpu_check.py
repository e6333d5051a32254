""".ci/gpu, the prepared GPU check, run here as its CPU dry run: every step but the test suite, at tiny sizes;
and what the dry run cannot reach: the check of its files, the recompile count, a KV cache that goes wrong."""
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ENV, FILES, HERE

GPU = os.path.join(HERE, ".ci", "gpu")


def gpu_script():
    """.ci/gpu as a module (it has no .py suffix), for its checks one by one."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", GPU)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def test_the_gpu_checks_dry_run_passes_every_step_and_summarises_it(gpu_dry_run):
    # the dry run itself started when the tests were collected (conftest.py), in a folder of its own
    out, returncode, output = gpu_dry_run
    assert returncode == 0, output[-2000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    steps = summary["steps"]
    assert list(steps) == ["prepare", "train_toy", "train_paper_shape", "train_fp16", "bench_gpt2", "torchrun_stop",
                           "torchrun_resume", "sample", "kv_cache_bf16", "steer"]
    assert all(s["rc"] == 0 and "problem" not in s for s in steps.values()), steps
    assert all((out / f"{n}.log").exists() for n in steps)
    assert steps["train_paper_shape"]["last_iter"] == 30 and "val_loss" in steps["train_paper_shape"]
    assert steps["train_fp16"]["loss"] < steps["train_fp16"]["first_loss"]
    kv = steps["kv_cache_bf16"]
    assert kv["decoded"] > 0 and kv["max_logit_difference"] <= kv["tolerance"]
    assert steps["bench_gpt2"]["bench"]["device"] == "cpu"
    assert summary["resumed_loss_matches_uninterrupted"]


def test_the_gpu_check_refuses_an_unknown_option(tmp_path):
    run = subprocess.run([sys.executable, GPU, str(tmp_path), "--cpu-dryrun"],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and run.stderr.strip() == \
        ".ci/gpu: unknown option --cpu-dryrun (see the docstring at the top of .ci/gpu)"
    assert not any(tmp_path.iterdir())


def test_the_gpu_check_runs_only_the_steps_named_in_the_order_named(tmp_path):
    run = subprocess.run([sys.executable, GPU, str(tmp_path), "--cpu-dry-run", "--steps=prepare"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "summary.json") as f:
        assert list(json.load(f)["steps"]) == ["prepare"]
    gpu = gpu_script()
    plan = gpu.steps(str(tmp_path), dry=False)
    assert [name for name, *_ in plan][:3] == ["tests", "prepare", "train_toy"]
    assert [name for name, *_ in gpu.select_steps(plan, ["steer", "tests", "prepare"])] == ["steer", "tests", "prepare"]
    assert gpu.select_steps(plan, None) == plan


def test_the_gpu_check_refuses_a_step_it_does_not_have(tmp_path):
    run = subprocess.run([sys.executable, GPU, str(tmp_path / "out"), "--cpu-dry-run", "--steps=prepare,train_tiny"],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1
    assert run.stderr.startswith(".ci/gpu: --steps names no step 'train_tiny'; the steps are prepare,train_toy,")
    assert not (tmp_path / "out").exists()


def test_the_gpu_checks_test_step_runs_the_files_that_hold_cuda_tests():
    gpu = gpu_script()
    tests_step = next(command for name, command, *_ in gpu.steps("out", dry=False) if name == "tests")
    # the files whose CUDA cases skip here, and one without any
    assert {"test_model.py", "tests/test_perf.py"} <= set(tests_step)
    assert "tests/test_gpu_check.py" not in tests_step


@pytest.mark.parametrize("files", ["absent", "empty"])
def test_the_gpu_check_without_its_files_stops_in_one_line_before_any_step(tmp_path, files):
    folder = tmp_path / "files"
    if files == "empty":
        folder.mkdir()
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, GPU, str(out), f"--files={folder}", "--cpu-dry-run"],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == "" and len(run.stderr.strip().splitlines()) == 1
    assert run.stderr.startswith(f".ci/gpu: --files={folder} needs tiktoken_cache/") and "it lacks all of them" in run.stderr
    assert all(name in run.stderr for name in gpu_script().TOKENIZER) and ".parquet" not in run.stderr  # not in a dry run
    assert not out.exists()  # no step ran: not even the folder of their logs


def test_the_gpu_check_needs_the_test_suites_sample_only_where_it_runs_the_suite(tmp_path):
    gpu = gpu_script()
    (tmp_path / "tiktoken_cache").mkdir()
    for name in gpu.TOKENIZER:
        shutil.copy(os.path.join(FILES, "tiktoken_cache", name), tmp_path / "tiktoken_cache")
    assert gpu.missing_inputs(str(tmp_path), tests=False) is None
    problem = gpu.missing_inputs(str(tmp_path), tests=True)
    assert "\n" not in problem and "; it lacks data/fineweb-edu-sample-150.parquet (" in problem
    assert gpu.missing_inputs(FILES, tests=True) is None


# train.py's loop with the tiny model, compiled as on a GPU but by dynamo alone (no C++ compiler):
# alpha annealed to 0 over 3 of 6 steps, then an evaluation in eval mode without grad; then an alpha
# that is a Python float dynamo specializes on, as torch did with floats before it made them dynamic:
# a graph per value. One process for both, each log after its name on stderr
DYNAMO_RUNS = """
import sys
import torch
from model import GPT, GPTConfig, annealed_alpha
print("model.py's alpha", file=sys.stderr, flush=True)
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=128, topk=8, n_nontopk=0))
compiled = torch.compile(model, backend="eager")
x = torch.randint(0, 128, (2, 16))
for it in range(6):
    model.set_alpha(annealed_alpha(it, 3))
    compiled(x, x, return_logits=False)[1].backward()
model.eval()
with torch.no_grad():
    compiled(x, x)

print("a float alpha", file=sys.stderr, flush=True)
torch._dynamo.config.automatic_dynamic_shapes = False
class Scaled(torch.nn.Module):
    alpha = 1.0
    def forward(self, x):
        return x * self.alpha
module, x = Scaled(), torch.randn(4)
compiled = torch.compile(module, backend="eager")
for it in range(12):
    module.alpha = 1 - it / 12
    compiled(x)
"""


@pytest.fixture(scope="module")
def dynamo_logs():
    """{run: what TORCH_LOGS=recompiles printed during it} of DYNAMO_RUNS."""
    run = subprocess.run([sys.executable, "-c", DYNAMO_RUNS], cwd=HERE, env={**ENV, "TORCH_LOGS": "recompiles"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    _, model_alpha, float_alpha = re.split(r"^(?:model.py's alpha|a float alpha)$", run.stderr, flags=re.M)
    return {"model.py's alpha": model_alpha, "a float alpha": float_alpha}


@pytest.mark.parametrize("run, recompiles, passes", [
    ("model.py's alpha", 2, True),  # the end of annealing, and evaluation
    ("a float alpha", None, False),
], ids=["model.py's alpha", "a float alpha"])
def test_the_recompile_count_is_read_from_dynamos_log_and_bounded(dynamo_logs, run, recompiles, passes):
    gpu = gpu_script()
    found = gpu.figures("train_toy", dynamo_logs[run])
    if recompiles is not None:
        assert found["recompiles"] == recompiles, dynamo_logs[run][-2000:]
    assert (gpu.few_recompiles(found) is None) == passes, found


def test_the_kv_cache_check_fails_on_a_cache_that_loses_its_place(gpu_dry_run, monkeypatch, capsys):
    import model
    out, returncode, output = gpu_dry_run
    assert returncode == 0, output[-2000:]
    gpu = gpu_script()
    gpu.kv_cache_check(str(out / "ddp"), "cpu")  # the real cache passes
    result = json.loads(capsys.readouterr().out)
    assert result["max_logit_difference"] <= result["tolerance"]
    append = model.KVCache.append

    def stuck(cache, k, v):  # a cache whose position never advances: each token is written over the last
        result = append(cache, k, v)
        cache.pos = 0
        return result

    monkeypatch.setattr(model.KVCache, "append", stuck)
    with pytest.raises(SystemExit) as stopped:
        gpu.kv_cache_check(str(out / "ddp"), "cpu")
    assert str(stopped.value).startswith(".ci/gpu: under bf16 the KV cache's logits differ from the uncached ones")
