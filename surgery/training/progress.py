"""The training progress bar of `surgery fit`: optimizer steps out of `trainer.max_steps` when steps bound the run.

Lightning's bars count the batches of the current epoch out of `max_epochs`, which a run bounded by `max_steps`
leaves at -1 ("Epoch 0/-2"), and after a mid-epoch resume they count from the resumed batch against the batches
left ("40/23"). This bar shows `epoch E, steps: 37/300`; a run bounded by epochs keeps Lightning's count. It
closes before the run's results are printed, so they start on a line of their own.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    @staticmethod
    def by_steps(trainer) -> bool:
        return trainer.max_steps > 0

    def _count_steps(self, trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # the rate counts this run's steps only
        bar.set_description(f"epoch {trainer.current_epoch}, steps")

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        if self.by_steps(trainer):  # a resume mid-epoch does not start the epoch again
            self._count_steps(trainer)

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not self.by_steps(trainer) or self.train_progress_bar is None:
            return super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)
        return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or not (step % max(self.refresh_rate, 1) == 0 or step >= trainer.max_steps):
            return None
        bar.update(step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        return None
