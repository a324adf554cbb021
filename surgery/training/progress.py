"""What `surgery fit` prints while it runs: the progress of training and the model summary.

Lightning's bars count the batches of the current epoch out of `max_epochs`, which a run bounded by `max_steps`
leaves at -1 ("Epoch 0/-2"), and after a mid-epoch resume they count from the resumed batch against the batches
left ("40/23"). `StepProgressBar` shows `epoch E, steps: 37/300` instead; a run bounded by epochs keeps Lightning's
count. It closes before the run's results are printed, so they start on a line of their own.

When stdout is not a terminal (a log file, a pipe, `nohup`), a redrawn bar would leave carriage returns and
cursor escapes in the log: the bar then prints whole lines instead, about ten per run (every tenth of
`max_steps`, after each validation, and at the end; every epoch for a run bounded by epochs), with no validation bars.

`ParamSummary` is Lightning's model summary without the FLOPs column and total, which read 0 unless a module
defines `example_input_array` (none here does); they are kept when they were measured.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

LOG_LINE_FORMAT = "{desc}: {percentage:3.0f}% | {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class StepProgressBar(TQDMProgressBar):
    """Args:
        log_lines: print whole lines instead of redrawing a bar (default: when stdout is not a terminal).
    """

    def __init__(self, *args, log_lines: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_lines = (not _is_terminal(sys.stdout)) if log_lines is None else log_lines
        self._due = False  # a log line is owed (a reporting step or a validation has passed since the last one)
        self._start: tuple[float, int] | None = None  # (time, global step) when this run's training started

    @staticmethod
    def by_steps(trainer) -> bool:
        return trainer.max_steps > 0

    # -- bars: disabled in log-lines mode, where `_log_line` reports instead -----------------------------
    def _quiet(self, make):
        return Tqdm(disable=True) if self.log_lines else make()

    def init_sanity_tqdm(self):
        return self._quiet(super().init_sanity_tqdm)

    def init_train_tqdm(self):
        return self._quiet(super().init_train_tqdm)

    def init_validation_tqdm(self):
        return self._quiet(super().init_validation_tqdm)

    def init_test_tqdm(self):
        return self._quiet(super().init_test_tqdm)

    def init_predict_tqdm(self):
        return self._quiet(super().init_predict_tqdm)

    def _count_steps(self, trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # the rate counts this run's steps only
        bar.set_description(f"epoch {trainer.current_epoch}, steps")

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._start = (time.monotonic(), trainer.global_step)
        if self.by_steps(trainer):  # a resume mid-epoch does not start the epoch again
            self._count_steps(trainer)
            if self.log_lines:
                self._log_line(trainer, args[0] if args else None)

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not self.by_steps(trainer) or self.train_progress_bar is None:
            return super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)
        return None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.log_lines:  # printed at the next batch or after the validation this step may start
            every = max(1, math.ceil(trainer.max_steps / 10))
            self._due = self._due or step % every == 0 or step >= trainer.max_steps
            return None
        bar = self.train_progress_bar
        if bar is None or bar.disable or not (step % max(self.refresh_rate, 1) == 0 or step >= trainer.max_steps):
            return None
        bar.update(step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        return None

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.log_lines and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._due = True
            self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.log_lines and not self.by_steps(trainer):
            self._due = True
            self._flush(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    # -- log-lines mode ----------------------------------------------------------------------------------
    def _flush(self, trainer, pl_module) -> None:
        if self.log_lines and self._due:
            self._due = False
            self._log_line(trainer, pl_module)

    def _log_line(self, trainer, pl_module) -> None:
        """One line in the terminal bar's words: `epoch 0, steps:  50% | 30/60 [00:08<00:08, 3.57it/s, train/loss=3.480]`."""
        if not trainer.is_global_zero:
            return
        started, first = self._start or (time.monotonic(), 0)
        metrics = self.get_metrics(trainer, pl_module) if pl_module is not None else {}
        postfix = ", ".join(f"{k}={Tqdm.format_num(v)}" for k, v in metrics.items() if v not in ("", None))
        if self.by_steps(trainer):
            n, total, desc = trainer.global_step, trainer.max_steps, f"epoch {trainer.current_epoch}, steps"
        else:  # bounded by epochs: finished epochs out of max_epochs
            n, total, desc = trainer.current_epoch + 1, max(trainer.max_epochs or 0, trainer.current_epoch + 1), "epochs"
            first = 0
        line = Tqdm.format_meter(n, total, time.monotonic() - started, prefix=desc, initial=first,
                                 postfix=postfix or None, bar_format=LOG_LINE_FORMAT)
        print(line, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class ParamSummary(ModelSummary):
    """Lightning's model summary as plain text on stdout, without the FLOPs column and total when they are 0
    (not measured)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        print(format_summary(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                             total_flops), flush=True)


def format_summary(columns: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                   model_size: float, training_modes: dict[str, int], total_flops: int) -> str:
    from lightning.pytorch.utilities.model_summary import get_human_readable_count as count

    if not total_flops:
        columns = [(name, values) for name, values in columns if name != "FLOPs"]
    widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
    rows = list(zip(*(values for _, values in columns)))
    lines = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths))]
    rule = "-" * len(lines[0])
    lines += [rule, *(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows), rule]
    totals = [(count(trainable_parameters), "Trainable params"),
              (count(total_parameters - trainable_parameters), "Non-trainable params"),
              (count(total_parameters), "Total params"),
              (f"{model_size:,.3f}", "Total estimated model params size (MB)"),
              (training_modes.get("train", 0), "Modules in train mode"),
              (training_modes.get("eval", 0), "Modules in eval mode")]
    if total_flops:
        totals.append((count(total_flops), "Total FLOPs"))
    lines += [f"{str(value):<10} {what}" for value, what in totals]
    return "\n".join(line.rstrip() for line in lines)
