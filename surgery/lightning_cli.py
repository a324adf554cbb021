"""`LightningCLI` for surgery recipes: model and data are chosen by `class_path` in the YAML."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from surgery.run import ExportRun


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
        # The data module owns the tokenizer; the model needs it for its vocabulary and its export.
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
