"""ablate.py: every arm x seed trained once with its flags, on the same tokens within a seed, and the
table of means, standard deviations and verdicts, on tiny runs of 2 steps."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ablation_flags, fingerprint, main_of
from toolkit import ablate
from toolkit.ablate import verdict


@pytest.fixture(scope="module")
def ablation(ablation_run):
    """ablate.py over two arms and two seeds of a tiny configuration, run in the background from the
    start of the session (conftest.py), then again in this process: (out_dir, what each call
    printed, the checkpoints' times after the first, the table)."""
    folder, returncode, first = ablation_run
    assert returncode == 0, first
    out = folder / "out"
    stamps = {p: os.stat(out / p / "ckpt.pt").st_mtime_ns for p in os.listdir(out) if (out / p).is_dir()}
    table = (out / "ablation.md").read_text()
    second = main_of("toolkit.ablate", *ablation_flags(folder))
    return out, first, second, stamps, table


def test_every_arm_and_seed_is_a_run_of_its_own_flags(ablation):
    out, *_ = ablation
    assert sorted(p for p in os.listdir(out) if (out / p).is_dir()) == ["k16-s1", "k16-s2", "step-s1", "step-s2"]
    log = (out / "step-s1" / "train.log").read_text()
    assert "iter 1: " in log and "alpha 0.000" in log.split("iter 1: ")[1].splitlines()[0]  # TopK from step 0
    assert "alpha 1.000" in (out / "k16-s1" / "train.log").read_text().split("iter 1: ")[1].splitlines()[0]
    # k16 is k 16, though the configuration file says topk = 8
    assert torch.load(out / "k16-s1" / "ckpt.pt", weights_only=True)["model_args"]["topk"] == 16


def test_the_table_gives_each_arm_and_the_claim_between_them(ablation):
    out, first, *_ = ablation
    table = (out / "ablation.md").read_text()
    assert table in first
    arms, _, claims, _, per_layer, _, losses, _, curve = table.strip().split("\n\n")
    assert [line.split(" | ")[0] for line in arms.splitlines()[2:]] == ["| k16", "| step"]
    for part in (per_layer, losses, curve):  # why an arm differs: per layer, by the target's frequency, in time
        assert [line.split(" | ")[0] for line in part.splitlines()[2:]] == ["| k16", "| step"]
    claim = [line for line in claims.splitlines() if line.startswith("| annealing from dense")]
    assert len(claim) == 1 and claim[0].rstrip(" |").endswith(("holds", "reversed", "inside the noise"))
    assert (out / "ablation.png").stat().st_size > 0 and (out / "ablation.json").stat().st_size > 0


def test_the_training_loss_is_read_from_the_log_train_py_wrote(ablation):
    out, *_ = ablation
    log = (out / "k16-s1" / "train.log").read_text()
    losses = ablate.logged_losses(str(out / "k16-s1"))
    assert sorted(losses) == [1, 2] and f"iter 2: loss {losses[2]:.6f}," in log
    assert ablate.logged_losses(str(out)) == {}  # no train.log: nothing logged, not an error


def test_a_second_call_trains_nothing_again(ablation):
    out, first, second, stamps, table = ablation
    assert {p: os.stat(out / p / "ckpt.pt").st_mtime_ns for p in stamps} == stamps
    assert (out / "ablation.md").read_text() == table and table in second  # the same numbers


def test_a_run_made_with_other_flags_is_refused_not_replaced(ablation, tmp_path):
    out, *_ = ablation
    (tmp_path / "k16-s1").mkdir()
    shutil.copy(out / "step-s1" / "ckpt.pt", tmp_path / "k16-s1")  # step annealing, where k16 wants linear
    before = fingerprint(tmp_path)
    flags = [f if not f.startswith("--out_dir=") else f"--out_dir={tmp_path}" for f in ablation_flags(out.parent)]
    with pytest.raises(SystemExit, match=r"k16-s1 holds a run with annealing_schedule=step, not the linear of arm k16"):
        main_of("toolkit.ablate", *flags, "--arms=k16", "--seeds=1")
    assert fingerprint(tmp_path) == before


def test_an_evaluation_with_other_settings_is_made_again(ablation, monkeypatch, tmp_path):
    out, *_ = ablation
    run = tmp_path / "k16-s1"
    shutil.copytree(out / "k16-s1", run)  # the study's own record stays as the other tests read it
    monkeypatch.setattr(ablate, "n_clusters", 3)
    monkeypatch.setattr(ablate, "eval_tokens", 500)
    monkeypatch.setattr(ablate, "entropy_tokens", 256)
    assert ablate.evaluate(str(run))["settings"]["n_clusters"] == 3
    assert json.loads((run / "evaluation.json").read_text())["settings"]["n_clusters"] == 3


@pytest.mark.parametrize("a,b,sign,says", [
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], -1, "holds"),  # a lower by 1 on every seed
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], +1, "reversed"),
    ([1.0, 2.0, 0.5], [1.2, 1.1, 1.0], -1, "inside the noise"),  # the sign changes from seed to seed
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], 0, "lower"),  # no predicted direction
])
def test_a_verdict_needs_a_paired_difference_of_2_standard_errors(a, b, sign, says):
    mean, se, verdict_text = verdict(a, b, sign)
    assert verdict_text == says and mean == pytest.approx(np.mean(np.subtract(a, b)))


def test_an_arm_ending_in_lr_scales_the_configurations_learning_rate_and_min_lr(tmp_path, monkeypatch):
    (tmp_path / "c.py").write_text("learning_rate = 2e-3\nmin_lr = 2e-4\n")
    monkeypatch.setattr(ablate, "config", str(tmp_path / "c.py"))
    flags = ablate.arm_flags("nontopk2-lr0.5", 1)
    assert "--learning_rate=0.001" in flags and "--min_lr=0.0001" in flags and flags[-1] == "--n_nontopk=2"
    assert not any(f.startswith(("--learning_rate", "--min_lr")) for f in ablate.arm_flags("nontopk2", 1))
    assert ablate.describe("nontopk2-lr2") == "two dense blocks at the end, learning rate x2"


def test_n_layer_sets_the_depth_of_every_arm(monkeypatch):
    monkeypatch.setattr(ablate, "n_layer", 8)
    assert all("--n_layer=8" in ablate.arm_flags(arm, 1) for arm in ablate.ARMS)
    monkeypatch.setattr(ablate, "n_layer", 0)
    assert not any(f.startswith("--n_layer") for f in ablate.arm_flags("k16", 1))  # the configuration's depth


@pytest.mark.parametrize("arm", ["k17", "k16-lr0", "k16-lrx", "-lr2"])
def test_an_unknown_arm_or_learning_rate_factor_is_refused(arm):
    with pytest.raises(SystemExit, match=rf"--arms: unknown arm '{arm}'"):
        main_of("toolkit.ablate", f"--arms={arm}")


def test_a_learning_rate_arm_needs_the_configurations_learning_rate(tmp_path):
    (tmp_path / "c.py").write_text("topk = 8\n")
    with pytest.raises(SystemExit, match=r"c.py must set learning_rate and min_lr for an arm ending in -lrF"):
        main_of("toolkit.ablate", f"--config={tmp_path}/c.py", f"--out_dir={tmp_path}/out", "--arms=k16-lr2")
    assert not (tmp_path / "out").exists()


def test_the_records_of_a_study_rebuild_its_table_without_the_checkpoints(ablation, tmp_path):
    out, *_, table = ablation
    kept = tmp_path / "kept"
    shutil.copytree(out, kept, ignore=shutil.ignore_patterns("ckpt.pt", "ablation.*"))
    flags = [f if not f.startswith("--out_dir=") else f"--out_dir={kept}" for f in ablation_flags(out.parent)]
    assert table in main_of("toolkit.ablate", *flags)  # nothing trained, nothing evaluated again
    assert not list(kept.glob("*/ckpt.pt")) and (kept / "ablation.md").read_text() == table


def test_a_record_without_its_checkpoint_is_not_evaluated_again_with_other_settings(ablation, tmp_path):
    out, *_ = ablation
    shutil.copytree(out / "k16-s1", tmp_path / "k16-s1", ignore=shutil.ignore_patterns("ckpt.pt"))
    with pytest.raises(SystemExit, match=r"k16-s1/evaluation.json was made with .* cannot be made again"):
        main_of("toolkit.ablate", *ablation_flags(out.parent)[:1], f"--out_dir={tmp_path}", "--arms=k16", "--seeds=1",
                "--max_iters=2", "--warmup_iters=1", "--eval_tokens=600")
