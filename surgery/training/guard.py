"""The divergence guard: a training step whose loss or gradient is not finite, or whose monitored loss jumps above
`factor` times its moving average, is not applied; the guard then skips the batch, rolls back to the
last checkpoint with a lower learning rate, or stops the run with a message. Every recipe gets it
through the CLI (`guard:` in the YAML); each event names the LayerNorm removed last when the module
removes them.

What is judged for spikes: the module's `spike_monitor` (a detached scalar it sets in each training
step) when it has one, else the training loss. A relative test only makes sense on a quantity whose
scale does not start near zero: a KL to the original model starts at ~0, so one LN removal that lifts it
from 0.02 to 0.07 looks like a 3.5x spike while the model barely moved. Distilling modules therefore
expose the next-token cross-entropy (nats/token), which every loss combination moves, as the monitor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn

from surgery.errors import SurgeryError
from surgery.training.resume import last_checkpoint, read_training_checkpoint


def last_removed(pl_module: L.LightningModule) -> str | None:
    """'h.1.ln_2 (removed at step 4, sigma 0.93)' from the module's removal callback; None without one."""
    removal = getattr(pl_module, "removal", None)
    if removal is None or not hasattr(removal, "removed"):
        return None
    if not removal.removed:
        return "none yet"
    step, name = removal.removed[-1]
    ln = getattr(removal, "points", {}).get(name)
    sigma = f", sigma {float(ln.sigma):.4g}" if ln is not None else ""
    return f"{name} (removed at step {step}{sigma})"


class DivergenceGuard(L.Callback):
    """Refuses steps whose loss diverges.

    A step is bad when its loss or monitored loss (averaged over ranks) or its gradient is not finite, or, after
    `warmup_steps` good steps, its monitored loss (`pl_module.spike_monitor`, else the loss) exceeds
    `factor` times the moving average (momentum `momentum`) of the good steps' monitored losses. A bad
    step's gradients are dropped before the optimizer sees them (no update, no optimizer state change)
    and the module's buffers (e.g. the fake LNs' moving averages) are put back as they were.

    Args:
        action: what follows a bad step: "skip" (the batch), "rollback" (weights and optimizer state
            from `<run_dir>/checkpoints/last.ckpt`, learning rate times `lr_scale`), "stop" (a
            SurgeryError with the step, loss and last LN removed) or "off" (no checks).
        factor: spike threshold as a multiple of the moving average (> 1).
        momentum: of the moving average of good losses.
        warmup_steps: good steps before spikes are judged (non-finite losses are judged from the start).
        lr_scale: learning-rate factor applied at each rollback, in (0, 1].
        max_bad_steps: stop after this many consecutive bad steps (skip) or this many rollbacks.
    """

    def __init__(self, action: Literal["skip", "rollback", "stop", "off"] = "skip", factor: float = 3.0,
                 momentum: float = 0.9, warmup_steps: int = 10, lr_scale: float = 0.5, max_bad_steps: int = 5):
        if not factor > 1:
            raise SurgeryError(f"guard.factor={factor!r}: a spike threshold must exceed 1 (times the average loss); try 3.0")
        if not 0 < lr_scale <= 1:
            raise SurgeryError(f"guard.lr_scale={lr_scale!r}: must be in (0, 1]; try 0.5")
        if not 0 <= momentum < 1 or warmup_steps < 0 or max_bad_steps < 1:
            raise SurgeryError(
                f"guard.momentum={momentum!r}, guard.warmup_steps={warmup_steps!r}, guard.max_bad_steps={max_bad_steps!r}: "
                "need 0 <= momentum < 1, warmup_steps >= 0 and max_bad_steps >= 1"
            )
        self.action, self.factor, self.momentum = action, factor, momentum
        self.warmup_steps, self.lr_scale, self.max_bad_steps = warmup_steps, lr_scale, max_bad_steps
        self.average: float | None = None
        self.good_steps = 0
        self.consecutive_bad = 0
        self.rollbacks = 0
        self.events: list[dict] = []
        self._bad: str | None = None
        self._loss = 0.0
        self._buffers: list[torch.Tensor] = []

    def setup(self, trainer, pl_module, stage) -> None:
        # Run after the other callbacks (schedules such as the LN removal act first, so the snapshot
        # holds the state the step starts from) and before the checkpoint callbacks.
        # A new list, not an edit in place: Lightning is iterating over the current one.
        others = [cb for cb in trainer.callbacks if cb is not self]
        i = next((i for i, cb in enumerate(others) if isinstance(cb, Checkpoint)), len(others))
        trainer.callbacks = others[:i] + [self] + others[i:]

    # -- detection ---------------------------------------------------------------------------------
    def _judge(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return "non-finite loss"
        if self.average is not None and self.good_steps >= self.warmup_steps and loss > self.factor * self.average:
            return f"loss above {self.factor:g} x its moving average {self.average:.4g}"
        return None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._bad = None
        if self.action != "off":
            self._buffers = [b.detach().clone() for b in pl_module.buffers()]

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.action == "off":
            return
        monitor = getattr(pl_module, "spike_monitor", None)
        if monitor is None:
            value = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        else:  # one reduction for both; a non-finite loss makes the monitor non-finite too
            both = torch.stack([loss.detach().float(), monitor.detach().float().to(loss.device)])
            both = trainer.strategy.reduce(both, reduce_op="mean")
            value = both[1] if torch.isfinite(both[0]) else both[0]
        self._loss = float(value)
        self._bad = self._bad or self._judge(self._loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.action == "off":
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self._bad:  # a finite loss can still back-propagate a NaN (e.g. through a square root at 0)
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                self._bad = "non-finite gradient"
        if self._bad:  # AdamW and the other torch optimizers leave parameters without a gradient alone
            for p in params:
                p.grad = None

    # -- response ----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.action == "off":
            return
        if not self._bad:
            self.average = self._loss if self.average is None else self.momentum * self.average + (1 - self.momentum) * self._loss
            self.good_steps += 1
            self.consecutive_bad = 0
            return
        with torch.no_grad():
            for b, saved in zip(pl_module.buffers(), self._buffers):
                b.copy_(saved)
        self.consecutive_bad += 1
        step = trainer.global_step - 1  # the step whose update was refused
        loss = self._loss if math.isfinite(self._loss) else str(self._loss)  # JSON has no nan / inf
        event = {"step": step, "loss": loss, "average": self.average, "reason": self._bad,
                 "action": self.action, "last_removed": last_removed(pl_module)}
        where = f" (last LayerNorm removed: {event['last_removed']})" if event["last_removed"] else ""
        text = f"step {step}: {self._bad} (loss {self._loss:.4g}); the update was not applied{where}"
        if self.action == "stop" or (self.action == "skip" and self.consecutive_bad >= self.max_bad_steps) \
                or (self.action == "rollback" and self.rollbacks >= self.max_bad_steps):
            self._record(trainer, {**event, "action": "stop"})
            raise SurgeryError(
                f"divergence guard stopped the run at {text}. {trainer.default_root_dir}/checkpoints/last.ckpt holds "
                "the last checkpoint: resume it (--ckpt_path last) with a lower model.init_args.lr, a later or "
                "slower removal schedule, or --guard.action skip / rollback"
            )
        if self.action == "rollback":
            event["action"] = self._rollback(trainer)
        self._record(trainer, event)
        rank_zero_warn(f"divergence guard: {text}; {event['action']}")
        pl_module.log("guard/bad_steps", float(len(self.events)), rank_zero_only=True)

    def _rollback(self, trainer) -> str:
        path = last_checkpoint(trainer.default_root_dir)
        if not path.exists():
            return "skip (no checkpoint to roll back to yet)"
        ckpt = read_training_checkpoint(path)
        lrs = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        trainer.strategy.load_model_state_dict(ckpt)
        trainer.strategy.load_optimizer_state_dict(ckpt)
        for opt, group_lrs in zip(trainer.optimizers, lrs):
            for g, lr in zip(opt.param_groups, group_lrs):
                g["lr"] = lr * self.lr_scale
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [b * self.lr_scale for b in config.scheduler.base_lrs]
        self.rollbacks += 1
        return f"rollback to step {ckpt['global_step']} ({path}), learning rate x{self.lr_scale ** self.rollbacks:g}"

    def _record(self, trainer, event: dict) -> None:
        self.events.append(event)
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "guard_events.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.events, indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"average": self.average, "good_steps": self.good_steps, "consecutive_bad": self.consecutive_bad,
                "rollbacks": self.rollbacks, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.average, self.good_steps = state["average"], state["good_steps"]
        self.consecutive_bad, self.rollbacks, self.events = state["consecutive_bad"], state["rollbacks"], state["events"]
