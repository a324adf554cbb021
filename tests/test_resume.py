"""A removal run SIGKILLed mid-schedule and restarted with the same command ends where an uninterrupted run
ends: same weights, sigma, removal log and validation loss. A corrupt last checkpoint is refused."""

import json
import os
import shutil

import pytest
import torch

from reliability_setup import REMOVAL_STEPS, fit_args, fit_subprocess, load, write_setup
from surgery.cli.entry import main


pytestmark = pytest.mark.slow  # every test reads the killed and resumed runs of one module fixture (seconds)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run `a` uninterrupted; run `b` killed at the start of step 14 (last checkpoint: step 12), then
    restarted with the same command (automatic resume)."""
    root = tmp_path_factory.mktemp("resume")
    recipe = write_setup(root)
    old = os.environ.get("SURGERY_CACHE")
    os.environ["SURGERY_CACHE"] = str(root / "cache")
    torch.set_num_threads(1)
    try:
        assert main(fit_args(recipe, root / "a")) == 0
        killed = fit_subprocess(fit_args(recipe, root / "b", "--trainer.callbacks+=reliability_setup.KillAt",
                                         "--trainer.callbacks.init_args.step", "14"), root / "cache")
        assert killed.returncode == -9, killed.stderr[-3000:]
        shutil.copytree(root / "b", root / "b_at_kill")
        assert main(fit_args(recipe, root / "b")) == 0
    finally:
        os.environ.pop("SURGERY_CACHE") if old is None else os.environ.__setitem__("SURGERY_CACHE", old)
    return root, recipe


def test_killed_run_left_a_mid_schedule_checkpoint(runs):
    root, _ = runs
    ckpt = load(root / "b_at_kill" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 12
    removed = dict((name, step) for step, name in ckpt["callbacks"]["RemovalCallback"]["removed"])
    assert removed == {n: s for n, s in REMOVAL_STEPS.items() if s <= 12}  # ln_f (step 14) still ahead
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]  # 10 batches per epoch
    assert not (root / "b_at_kill" / "metrics.json").exists()
    assert ckpt["callbacks"]["ExportRun"]["train_time_s"] > 0  # training time so far travels with the checkpoint
    assert ckpt["TokenBlocks"] == {"order_seed": 3}  # the training order's seed too (the run's seed_everything)


def test_resumed_run_matches_uninterrupted_run(runs):
    root, _ = runs
    a = json.loads((root / "a" / "metrics.json").read_text())
    b = json.loads((root / "b" / "metrics.json").read_text())
    assert a["steps"] == b["steps"] == 16
    before_kill = load(root / "b_at_kill" / "checkpoints" / "last.ckpt")["callbacks"]["ExportRun"]["train_time_s"]
    assert b["train_time_s"] > before_kill  # both parts of the interrupted run are counted
    diff = abs(a["val"]["loss"] - b["val"]["loss"])
    print(f"final val loss: uninterrupted {a['val']['loss']:.6f}, killed+resumed {b['val']['loss']:.6f}, diff {diff:.2e}")
    assert diff <= 1e-3
    ca, cb = load(root / "a" / "checkpoints" / "last.ckpt"), load(root / "b" / "checkpoints" / "last.ckpt")
    assert ca["global_step"] == cb["global_step"] == 16
    for name, t in ca["state_dict"].items():  # weights, sigma, moving averages, fake flags
        assert torch.allclose(t, cb["state_dict"][name], atol=1e-6, rtol=0), name
    sigmas = {k: float(v) for k, v in cb["state_dict"].items() if k.endswith(".sigma")}
    assert len(sigmas) == 7 and all(v > 0 for v in sigmas.values())  # every point went fake with a measured sigma
    ra, rb = ca["callbacks"]["RemovalCallback"], cb["callbacks"]["RemovalCallback"]
    assert ra["removed"] == rb["removed"] and dict((n, s) for s, n in rb["removed"]) == REMOVAL_STEPS
    assert ra["history"]["step"] == rb["history"]["step"] == list(range(1, 17))
    assert ra["history"]["loss"] == pytest.approx(rb["history"]["loss"], abs=1e-5)
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    assert ca["lr_schedulers"][0]["last_epoch"] == cb["lr_schedulers"][0]["last_epoch"] == 16


def test_interrupted_runs_training_log_is_kept(runs):
    import csv

    root, _ = runs
    logs = root / "b" / "logs"
    before = [r for r in csv.DictReader((logs / "metrics.part1.csv").open()) if r.get("train/loss")]
    after = [r for r in csv.DictReader((logs / "metrics.csv").open()) if r.get("train/loss")]
    assert [int(r["step"]) for r in before][:3] == [0, 1, 2] and max(int(r["step"]) for r in before) >= 12
    assert min(int(r["step"]) for r in after) >= 12 and max(int(r["step"]) for r in after) == 15


def test_corrupt_last_checkpoint_is_refused(runs, tmp_path, capsys):
    root, recipe = runs
    run = tmp_path / "c"
    shutil.copytree(root / "b_at_kill", run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert main(fit_args(recipe, run)) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{last}' is truncated or corrupt and cannot be resumed" in err
    assert "Delete it and resume from an earlier checkpoint (--ckpt_path FILE), or start a new run directory" in err
