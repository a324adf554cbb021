"""`LightningCLI` for surgery recipes: model and data are chosen by `class_path` in the YAML.

Everything a run writes goes under `trainer.default_root_dir` (the run directory): the config, the
CSV logs (`logs/`), the checkpoints (`checkpoints/`, `last.ckpt` for `--ckpt_path last`), the
exported model (`model/`), `metrics.json` and plots.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from surgery.publish.callback import PublishRun
from surgery.run import ExportRun


class RunCheckpoint(ModelCheckpoint):
    """Saves `<run_dir>/checkpoints/last.ckpt` every `every_n_train_steps` optimizer steps.

    Args:
        every_n_train_steps: steps between checkpoints (0 turns periodic checkpoints off).
    """

    def __init__(self, every_n_train_steps: int = 100):
        super().__init__(every_n_train_steps=every_n_train_steps or None, save_last=True, save_top_k=0)

    def setup(self, trainer, pl_module, stage) -> None:
        self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)


class SurgeryCLI(LightningCLI):
    def __init__(self, args=None):
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportRun, "export")
        parser.add_lightning_class_args(PublishRun, "publish")  # after export: publishes the exported run
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # The data module owns the tokenizer; the model needs it for its vocabulary and its export.
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.default_root_dir is None:
            trainer.default_root_dir = "runs/default"
        if trainer.logger in (None, True):
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": trainer.default_root_dir, "name": "logs", "version": ""},
            }
