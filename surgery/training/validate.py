"""Checks of a `surgery fit` configuration that run before training starts, after the model and data
modules are built. Each failure is a `SurgeryError` naming the config key, the bad value and the fix.

Checks made elsewhere, closer to their inputs: unknown config keys and wrong types (the Lightning CLI's
parser, exit status 2), the removal schedule (`RemovalSchedule.removal_steps`), unknown mixers
(`surgery.xatl.mixers`), unsupported model families (`surgery.families.family_of`), model files
(`surgery.models.loading`), the run directory and checkpoint to resume (`surgery.training.resume.choose_checkpoint`).

Not an error but worth a line: model settings counted in steps that the run never reaches
(`steps_beyond_run`, printed once at the start of fit by `warn_steps_beyond_run`).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L

from surgery.data.datamodule import TokenBlocks
from surgery.errors import SurgeryError
from surgery.families import context_length_of


def _fail(key: str, value: Any, problem: str, fix: str) -> SurgeryError:
    return SurgeryError(f"{key}={value!r}: {problem}; {fix}")


def check_trainer_config(trainer: Any) -> None:
    """Step counts, from the parsed config before the Trainer is built (it rejects some with its own error):
    `max_steps` is -1 (no limit: epochs decide) or positive; so is `max_epochs` when given."""
    if trainer.max_steps == 0 or trainer.max_steps < -1:
        raise _fail("trainer.max_steps", trainer.max_steps, "a run needs at least one optimizer step",
                    "set a positive number of steps (or -1 to let trainer.max_epochs decide)")
    if trainer.max_epochs is not None and (trainer.max_epochs == 0 or trainer.max_epochs < -1):
        raise _fail("trainer.max_epochs", trainer.max_epochs, "a run needs at least one epoch",
                    "set a positive number of epochs, or -1 with trainer.max_steps")
    check_accelerator(getattr(trainer, "accelerator", None))


def check_accelerator(accelerator: Any) -> None:
    """A GPU accelerator named in the config must be present (Lightning's own error is a raw traceback)."""
    import torch

    name = accelerator.lower() if isinstance(accelerator, str) else None
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise _fail("trainer.accelerator", accelerator, "this machine has no CUDA GPU that torch can use",
                    "set trainer.accelerator to cpu (or auto), or install the CUDA build of torch on a GPU machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise _fail("trainer.accelerator", accelerator, "Apple's MPS backend is not available here",
                    "set trainer.accelerator to cpu (or auto)")


# (hparam, test, what it must be)
_HPARAM_RULES: list[tuple[str, Any, str]] = [
    ("lr", lambda v: v > 0, "a positive learning rate"),
    ("warmup_steps", lambda v: v >= 0, "a non-negative number of warm-up steps"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "the final lr as a share of the peak, between 0 and 1"),
    ("weight_decay", lambda v: v >= 0, "non-negative"),
    ("betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two AdamW betas in [0, 1)"),
    ("momentum", lambda v: 0 <= v < 1, "a moving-average momentum in [0, 1)"),
    ("aux_loss_weight", lambda v: v >= 0, "a non-negative loss weight"),
    ("calibration_batches", lambda v: v > 0, "a positive number of batches"),
]


def check_module(module: L.LightningModule) -> None:
    """Optimizer and surgery settings stored in the module's hyperparameters."""
    hp = getattr(module, "hparams", {})
    for name, ok, what in _HPARAM_RULES:
        value = hp.get(name)
        if value is not None and not ok(value):
            raise _fail(f"model.init_args.{name}", value, f"must be {what}", f"set model.init_args.{name} to {what}")


def check_model_and_data(module: L.LightningModule, datamodule: L.LightningDataModule | None) -> None:
    """Sequence length against the model's positions; tokenizer against the model's vocabulary; both splits
    non-empty (this tokenizes the corpus, as training would at once)."""
    model = getattr(module, "model", None)
    config = getattr(model, "config", None)
    if datamodule is None or config is None:
        return
    block_size = getattr(datamodule, "block_size", None)
    positions = context_length_of(config)
    if block_size is not None and positions is not None and block_size > positions:
        raise _fail("data.init_args.block_size", block_size, f"the model has only {positions} positions",
                    f"set data.init_args.block_size to at most {positions}")
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None and hasattr(model, "get_input_embeddings"):
        n_emb = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > n_emb:
            raise _fail("data.init_args.tokenizer", getattr(datamodule, "tokenizer_spec", tokenizer.name_or_path),
                        f"its {len(tokenizer)} entries do not fit the model's {n_emb} embeddings",
                        "use the tokenizer the model was trained with")
    if isinstance(datamodule, TokenBlocks):  # raises, naming the fix, on a split with less than one block
        for split in ("train", "validation"):
            datamodule.split(split)


def _counts_steps(key: str) -> bool:
    return key == "step" or key.endswith("_steps")


def steps_beyond_run(config: dict, max_steps: int) -> list[tuple[str, int]]:
    """`(key, value)` of each setting under `model.init_args` counted in optimizer steps (named `step` or
    `*_steps`, at any depth: `warmup_steps`, `unfreeze.step`, `unfreeze.warmup_steps`, ...) whose value exceeds
    `max_steps`, in the order of the config. Knows no surgery: it reads names only. Nothing when steps do not
    bound the run (`max_steps` -1)."""
    if max_steps is None or max_steps <= 0:
        return []
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, dict) else None
    found: list[tuple[str, int]] = []

    def walk(prefix: str, node: Any) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            name = f"{prefix}.{key}"
            if isinstance(value, dict):
                walk(name, value)
            elif _counts_steps(str(key)) and isinstance(value, int) and not isinstance(value, bool) and value > max_steps:
                found.append((name, value))

    walk("model.init_args", init_args)
    return found


def warn_steps_beyond_run(config: dict, max_steps: int, stream=None) -> list[tuple[str, int]]:
    """One line on stderr naming each setting of `steps_beyond_run`; returns them."""
    found = steps_beyond_run(config, max_steps)
    if found:
        settings = ", ".join(f"{key}={value}" for key, value in found)
        one = len(found) == 1
        print(f"surgery fit: warning: {settings} {'exceeds' if one else 'exceed'} trainer.max_steps={max_steps}: the run "
              f"ends before {'it takes' if one else 'they take'} full effect; raise trainer.max_steps or lower "
              f"{'it' if one else 'them'}", file=stream or sys.stderr, flush=True)
    return found


def check_fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule | None) -> None:
    check_trainer_config(trainer)
    check_module(module)
    check_model_and_data(module, datamodule)
