"""Checkpoint files: a write killed half-way leaves the previous checkpoint intact; what `surgery fit`
resumes from in each state of a run directory; checkpoints load weights-only."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.cli.lightning_cli import RunCheckpoint
from surgery.training.resume import AtomicCheckpointIO, choose_checkpoint, plain, read_training_checkpoint

KILL_MID_WRITE = """
import io, os, signal, sys, torch
from surgery.training.resume import AtomicCheckpointIO
real_save = torch.save
def save_half_then_die(obj, f):
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
AtomicCheckpointIO().save_checkpoint(
    {"state_dict": {"w": torch.ones(100_000)}, "loops": {}, "global_step": 2, "optimizer_states": [], "lr_schedulers": []},
    sys.argv[1])
"""


def training_checkpoint(step: int, **extra) -> dict:
    return {"state_dict": {"w": torch.full((100_000,), float(step))}, "loops": {}, "global_step": step,
            "optimizer_states": [], "lr_schedulers": [], **extra}


@pytest.mark.slow
def test_kill_mid_write_keeps_the_previous_checkpoint(tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(1), last)
    done = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(last)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr[-2000:]
    [partial] = list(last.parent.glob(".last.ckpt.*.tmp"))  # the cut-short write, under a name never resumed
    assert 0 < partial.stat().st_size < last.stat().st_size
    ckpt = read_training_checkpoint(last)
    assert ckpt["global_step"] == 1 and float(ckpt["state_dict"]["w"][0]) == 1.0
    assert choose_checkpoint(tmp_path / "run", None, auto_resume=True, overwrite=False) == str(last)
    assert not partial.exists()  # cleaned up when the run restarts


def test_a_plain_write_cut_short_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(training_checkpoint(1), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # what a non-atomic writer leaves after a kill
    with pytest.raises(SurgeryError, match="is truncated or corrupt and cannot be resumed"):
        read_training_checkpoint(path)


def test_what_a_run_directory_resumes_from(tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    assert choose_checkpoint(run, None, True, False) is None  # new directory: fresh start
    assert choose_checkpoint(run, "last", True, False) is None  # --ckpt_path last before the first checkpoint
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(4), last)
    assert choose_checkpoint(run, None, True, False) == str(last)  # automatic resume
    assert choose_checkpoint(run, "last", False, False) == str(last)
    (run / "metrics.json").write_text('{"steps": 8}')
    assert choose_checkpoint(run, "last", True, False) == str(last)  # continue a finished run on purpose
    with pytest.raises(SurgeryError, match=r"holds a finished run \(.*metrics.json after 8 steps\)"):
        choose_checkpoint(run, None, True, False)
    assert choose_checkpoint(run, None, True, True) is None  # overwrite: start again
    assert not last.exists() and not (run / "metrics.json").exists()


@dataclass
class Schedule:
    start: int = 3
    gaps: tuple = (1, 2)


def test_checkpoints_hold_only_weights_only_values(tmp_path):
    hp = {"schedule": Schedule(), "betas": (0.9, 0.95), "tokenizer_dir": Path("/x"), "n": None}
    assert plain(hp) == {"schedule": {"start": 3, "gaps": (1, 2)}, "betas": (0.9, 0.95), "tokenizer_dir": "PosixPath('/x')", "n": None}
    path = tmp_path / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(1, hyper_parameters=hp), path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["schedule"] == {"start": 3, "gaps": (1, 2)}


def test_run_checkpoint_carries_the_rng_state():
    cb = RunCheckpoint(every_n_train_steps=5)
    torch.manual_seed(1)
    state = cb.state_dict()
    expected = torch.rand(3)
    torch.manual_seed(2)
    cb.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected) and cb.state_key == "RunCheckpoint"
