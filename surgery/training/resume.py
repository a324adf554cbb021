"""Exact resume: checkpoint files written atomically, checked before they are resumed, and the choice of
what a `surgery fit` starts from (`--ckpt_path last`, automatic resume, or a fresh run directory).

A Lightning checkpoint of a surgery run holds only tensors, numbers, strings and plain containers
(model and optimizer state, loop progress, callback state, `hf_config`, the torch RNG state), so
it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from surgery.errors import SurgeryError
from surgery.models.loading import read_checkpoint

TRAINING_KEYS = ("state_dict", "loops", "global_step", "optimizer_states", "lr_schedulers")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain(value: Any) -> Any:
    """`value` with dataclasses turned into dicts and other objects into their repr: what
    `torch.load(weights_only=True)` accepts (tensors, numbers, strings, None and plain containers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if type(value) in (list, tuple) else [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    return repr(value)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a hidden temporary file beside its target, syncs it to disk, then renames
    it over the target (`os.replace`, atomic on POSIX): a kill at any moment leaves either the old or
    the new file under the checkpoint's name, never a partial one. Remote paths use Lightning's writer.
    Hyperparameters are stored as plain values (`plain`), so every checkpoint loads weights-only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "hyper_parameters" in checkpoint:  # e.g. a schedule dataclass passed in Python, not from a YAML
            checkpoint = {**checkpoint, "hyper_parameters": plain(checkpoint["hyper_parameters"])}
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not `last*.ckpt`: never taken as a checkpoint
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def read_training_checkpoint(path: str | Path, weights_only: bool = True) -> dict:
    """A checkpoint a run can resume from (`surgery.models.loading.read_checkpoint`, checked for the trainer's state).

    Raises SurgeryError naming the file and what to do when it is missing, truncated or corrupt, holds
    objects that `weights_only` loading refuses, or is not a training checkpoint Lightning can resume.
    """
    if not Path(path).is_file():
        raise SurgeryError(f"checkpoint {str(path)!r} does not exist: check --ckpt_path")
    ckpt = read_checkpoint(path, weights_only, use="resumed", fix="Delete it and resume from an earlier checkpoint "
                           "(--ckpt_path FILE), or start a new run directory")
    missing = [k for k in TRAINING_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(TRAINING_KEYS)
    if missing:
        raise SurgeryError(
            f"checkpoint {str(path)!r} is not a training checkpoint (it lacks {', '.join(missing)}): a run can resume "
            "only from a checkpoint its trainer wrote; to start from these weights use model.init_args.init instead"
        )
    return ckpt


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def choose_checkpoint(run_dir: str | Path, ckpt_path: str | None, auto_resume: bool, overwrite: bool) -> str | None:
    """What `surgery fit` resumes from: a checked checkpoint path, or None for a fresh start.

    - `ckpt_path="last"`: `<run_dir>/checkpoints/last.ckpt` if it exists, else a fresh start (so one
      command both starts and resumes a preemptible job).
    - no `ckpt_path`: a finished run (`metrics.json`) is refused unless `overwrite` (then its
      `metrics.json` and `last.ckpt` are deleted); an unfinished one with `last.ckpt` is resumed
      when `auto_resume`, refused otherwise.
    - a file: that checkpoint.
    """
    run_dir = Path(run_dir)
    last = last_checkpoint(run_dir)
    metrics = run_dir / "metrics.json"
    if os.environ.get("LOCAL_RANK", "0") == "0":  # temporary files of writes cut short by a kill
        for stale in last.parent.glob(".*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)
    if ckpt_path == "last":
        if not last.exists():
            rank_zero_info(f"--ckpt_path last: no {last} yet, starting a fresh run")
            return None
        ckpt_path = str(last)
    elif ckpt_path is None:
        if metrics.exists() and not overwrite:
            raise SurgeryError(
                f"trainer.default_root_dir={str(run_dir)!r} holds a finished run ({metrics} after "
                f"{_steps(metrics)} steps): choose a new trainer.default_root_dir, pass --ckpt_path last to continue "
                "it (with a higher trainer.max_steps), or --checkpoint.overwrite true to replace it"
            )
        if overwrite:
            if os.environ.get("LOCAL_RANK", "0") == "0":
                metrics.unlink(missing_ok=True)
                last.unlink(missing_ok=True)
            return None
        if not last.exists():
            return None
        if not auto_resume:
            raise SurgeryError(
                f"{last} exists: this run directory holds an interrupted run. Pass --ckpt_path last to resume it, "
                "choose a new trainer.default_root_dir, or --checkpoint.overwrite true to start it again"
            )
        ckpt_path = str(last)
    ckpt = read_training_checkpoint(ckpt_path)
    rank_zero_info(f"resuming from {ckpt_path} (step {ckpt['global_step']})")
    return str(ckpt_path)


# Settings a resumed run may change: how long it runs, what it validates, logs and shows, where it
# checkpoints, exports and publishes, the divergence guard and the backend; and seed_everything, which a
# resume does not use (the checkpoint restores the RNG state and the data order) and which a recipe without
# one draws afresh at every start. Every other key (the model, the data, batch and precision settings of
# the trainer) must match the checkpoint's.
FREE_TO_CHANGE = (
    "config", "ckpt_path", "weights_only", "seed_everything", "export", "publish", "checkpoint", "guard",
    "trainer.logger", "trainer.callbacks", "trainer.default_root_dir", "trainer.max_steps", "trainer.max_epochs",
    "trainer.max_time", "trainer.min_steps", "trainer.min_epochs", "trainer.limit_val_batches",
    "trainer.limit_test_batches", "trainer.limit_predict_batches", "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch", "trainer.num_sanity_val_steps", "trainer.log_every_n_steps",
    "trainer.enable_checkpointing", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.enable_autolog_hparams", "trainer.profiler", "trainer.detect_anomaly", "trainer.accelerator",
    "trainer.strategy", "trainer.deterministic", "trainer.benchmark", "trainer.inference_mode", "trainer.model_registry",
)


def _flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
    """Keys (dotted, e.g. `model.init_args.lr`) whose value differs between a checkpoint's run config and the
    current one: {key: (saved, current)}. Keys in `FREE_TO_CHANGE` (and below them) are left out, and so are
    keys only one side has (a setting added to or removed from surgery between the two runs)."""
    a, b = _flatten(saved), _flatten(current)
    free = lambda key: any(key == f or key.startswith(f + ".") for f in FREE_TO_CHANGE)  # noqa: E731
    return {k: (a[k], b[k]) for k in a if k in b and a[k] != b[k] and not free(k)}


def _arg(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else (value if value and " " not in value else json.dumps(value))


def check_resume_config(ckpt_path: str, ckpt: Mapping, current: Mapping, accept: bool, run_dir: str | Path) -> dict | None:
    """Compare the run config a checkpoint was trained with (saved by `RunCheckpoint`) with the current one.

    No differences (or a checkpoint without a saved config): None. Differences: a SurgeryError naming each
    changed key, its two values and the flags that restore the checkpoint's, unless `accept`; then the
    record {"step", "checkpoint", "changes": {key: [saved, current]}}, appended to
    `<run_dir>/resume_changes.json` (the export copies it into metrics.json).
    """
    saved = (ckpt.get("callbacks") or {}).get("RunCheckpoint", {}).get("config")
    changes = config_changes(saved, current) if isinstance(saved, Mapping) else {}
    if not changes:
        return None
    step = int(ckpt.get("global_step", 0))
    listed = "\n".join(f"  {k}: {_arg(old)} (checkpoint) -> {_arg(new)} (now)" for k, (old, new) in changes.items())
    if not accept:
        back = " ".join(f"--{k} {_arg(old)}" for k, (old, _) in changes.items())
        raise SurgeryError(
            f"{ckpt_path} (step {step}) was trained with other settings than this command's:\n{listed}\n"
            "A resumed run keeps the checkpoint's optimizer, learning-rate schedule and data order, so these would be "
            f"mixed with the old ones. Resume with the checkpoint's settings ({back}), choose a new "
            "trainer.default_root_dir to start a new run, or pass --checkpoint.accept_changes true to resume with the "
            "new settings anyway (the changes are recorded in resume_changes.json and metrics.json)"
        )
    record = {"step": step, "checkpoint": str(ckpt_path), "changes": {k: [old, new] for k, (old, new) in changes.items()},
              "note": "the optimizer state (lr, betas, weight decay) and the learning-rate schedule came from the checkpoint"}
    rank_zero_info(f"resuming {ckpt_path} (step {step}) with changed settings (--checkpoint.accept_changes):\n{listed}")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        path = Path(run_dir) / "resume_changes.json"
        earlier = json.loads(path.read_text()) if path.exists() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(earlier + [record], indent=2) + "\n")
    return record


def _steps(metrics: Path) -> str:
    try:
        return str(json.loads(metrics.read_text()).get("steps", "?"))
    except (OSError, ValueError):
        return "?"


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU and every CUDA device): dropout masks after a resume match an uninterrupted run."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
