"""When each LayerNorm goes fake: the removal schedule and the Lightning callback that applies it."""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L

from surgery.errors import SurgeryError
from surgery.remove_ln.fake_ln import SwitchableLayerNorm
from surgery.remove_ln.points import BASE_KINDS, KINDS, point_kinds, point_names


@dataclass
class RemovalSchedule:
    """Optimizer steps at which LayerNorms go fake.

    Args:
        start: step of the first removal.
        gaps: steps between a removal and the next one, by the kind of the next one (`ln_q`, `ln_k`,
            `ln_attn_out`, `ln_mlp_out`, `ln_2`, `ln_1_qk`, `ln_1_v`, `ln_f`; a kind left out: 0). Kinds go in
            `order`, each block by block; a model has only the kinds of its family's norms
            (`surgery.remove_ln.points.family_kinds`).
        order: the order of the kinds (default `surgery.remove_ln.points.KINDS`); must list every kind the model has.
        events: explicit `{point: step}` for every point instead of start/gaps/order (e.g. `h.0.ln_2: 200`).
        special_first / special_eot: give the first position / end-of-text tokens their own sigma
            while the transition runs (Heimersheim 2024); dropped at `drop_eot_after` /
            `drop_first_after` steps after the last removal.
    """

    start: int = 20
    gaps: dict[str, int] = field(default_factory=lambda: {"ln_q": 2, "ln_k": 2, "ln_attn_out": 2, "ln_mlp_out": 2,
                                                          "ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3, "ln_f": 2})
    order: list[str] | None = None
    events: dict[str, int] | None = None
    special_first: bool = False
    special_eot: bool = False
    drop_eot_after: int = 20
    drop_first_after: int = 40

    def removal_steps(self, n_blocks: int, kinds=BASE_KINDS) -> dict[str, int]:
        """{point name: step}, in removal order, for a model of `n_blocks` blocks whose points are of `kinds`."""
        names = point_names(n_blocks, kinds)
        order = self._order(kinds)
        valid = [n for k in order for n in names[k]]
        if self.events is not None:
            unknown = sorted(set(self.events) - set(valid))
            missing = [n for n in valid if n not in self.events]
            if unknown or missing:
                raise SurgeryError(
                    f"schedule.events names {unknown or 'no unknown points'} and omits {missing or 'none'}; "
                    f"this {n_blocks}-block model has exactly: {', '.join(valid)}"
                )
            bad = {n: s for n, s in self.events.items() if not isinstance(s, int) or s < 0}
            if bad:
                raise SurgeryError(f"schedule.events steps must be non-negative integers (got {bad})")
            return dict(sorted(self.events.items(), key=lambda kv: kv[1]))
        unknown = sorted(set(self.gaps) - set(KINDS))
        if unknown or any(g < 0 for g in self.gaps.values()) or self.start < 0:
            raise SurgeryError(
                f"schedule.gaps takes kinds {', '.join(KINDS)} with non-negative gaps and schedule.start >= 0 "
                f"(got start={self.start}, gaps={self.gaps})"
            )
        steps: dict[str, int] = {}
        step = None
        for kind in order:
            for name in names[kind]:
                step = self.start if step is None else step + self.gaps.get(kind, 0)
                steps[name] = step
        return steps

    def _order(self, kinds) -> list[str]:
        """The model's kinds in `order` (default `KINDS`); SurgeryError for an order that misses one or names others."""
        if self.order is None:
            return [k for k in KINDS if k in kinds]
        unknown, missing = sorted(set(self.order) - set(KINDS)), [k for k in kinds if k not in self.order]
        if unknown or missing or len(set(self.order)) != len(self.order):
            raise SurgeryError(f"schedule.order must list each kind of this model once (it has {', '.join(kinds)}); "
                               f"got {self.order}: unknown {unknown or 'none'}, missing {missing or 'none'}")
        return [k for k in self.order if k in kinds]

    def last_step(self, n_blocks: int, kinds=BASE_KINDS) -> int:
        """The step after which the model has no LayerNorm and no special sigma left."""
        last = max(self.removal_steps(n_blocks, kinds).values())
        tail = max(self.drop_eot_after if self.special_eot else 0, self.drop_first_after if self.special_first else 0)
        return last + tail


class RemovalCallback(L.Callback):
    """Applies the schedule at the start of each training batch and records sigma and loss for plots.

    State in the checkpoint: the removal log, the history and the calibration table; the LNs' own
    state (fake flags, sigma, moving averages) is in the model's buffers.
    """

    def __init__(self, schedule: RemovalSchedule, points: dict[str, SwitchableLayerNorm], table: dict[str, float] | None = None):
        self.schedule, self.points, self.table = schedule, points, table
        n_blocks = len({n.split(".")[1] for n in points if n.startswith("h.")})
        self.steps = schedule.removal_steps(n_blocks, point_kinds(points))
        self.removed: list[tuple[int, str]] = []
        self.history: dict[str, list] = {"step": [], "loss": [], **{n: [] for n in points}}

    def apply(self, step: int) -> list[str]:
        """Make fake every point due by `step`; drop specials when due. Returns the points removed now."""
        done = []
        for name, at in self.steps.items():
            ln = self.points[name]
            if at <= step and not ln.is_fake:
                sigma = self.table[name] if self.table else None
                ln.go_fake(sigma, self.schedule.special_first, self.schedule.special_eot)
                self.removed.append((step, name))
                done.append(name)
        last = max(self.steps.values())
        for ln in self.points.values():
            if ln.is_fake and step >= last + self.schedule.drop_eot_after:
                ln.drop_specials(eot=True)
            if ln.is_fake and step >= last + self.schedule.drop_first_after:
                ln.drop_specials(first=True)
        return done

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for name in self.apply(trainer.global_step):
            pl_module.log(f"removed/{name}", float(self.points[name].sigma.mean()), rank_zero_only=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["lm_loss"] if isinstance(outputs, dict) and "lm_loss" in outputs else outputs["loss"]
        self.history["step"].append(trainer.global_step)
        self.history["loss"].append(float(loss))
        if isinstance(outputs, dict) and "control_loss" in outputs:
            self.history.setdefault("control_loss", []).append(float(outputs["control_loss"]))
        for name, ln in self.points.items():
            self.history[name].append(float((ln.sigma if ln.is_fake else ln.avg_std).mean()))  # per-head: mean of heads

    def state_dict(self) -> dict:
        return {"removed": self.removed, "history": self.history, "table": self.table}

    def load_state_dict(self, state: dict) -> None:
        self.removed = [tuple(r) for r in state["removed"]]
        self.history = state["history"]
        self.table = state.get("table") or self.table
        if self.table:  # a resumed table run keeps its measured table and does not measure again
            for ln in self.points.values():
                ln.track = False
