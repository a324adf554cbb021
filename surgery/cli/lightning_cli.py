"""`LightningCLI` for surgery recipes: model and data are chosen by `class_path` in the YAML.

Everything a run writes goes under `trainer.default_root_dir` (the run directory): the config, the
CSV logs (`logs/`), the checkpoints (`checkpoints/`, `last.ckpt` for `--ckpt_path last`), the
exported model (`model/`), `metrics.json` and plots.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from surgery.training import run_lock
from surgery.publish.callback import PublishRun
from surgery.errors import SurgeryError
from surgery.training.guard import DivergenceGuard
from surgery.cli.parse_errors import RECIPE_USAGE, SurgeryArgumentParser
from surgery.training.progress import ParamSummary, StepProgressBar
from surgery.training.resume import (AtomicCheckpointIO, check_resume_config, choose_checkpoint, plain, read_training_checkpoint, rng_state,
                            set_rng_state)
from surgery.training.run import ExportRun
from surgery.training.validate import check_fit, check_trainer_config, warn_steps_beyond_run

# The LightningModules and data modules of the recipes, imported when the CLI is built (not when `surgery` starts,
# so `surgery --help` loads no torch): `surgery fit --help` lists them as the known subclasses of `--model` and
# `--data`, and `--model LNRemoval` / `--model.help LNRemoval` find them by class name.
RECIPE_MODULES = (
    "surgery.training.lm",  # CausalLM: pretraining and plain fine-tuning
    "surgery.remove_ln.module",  # LNRemoval
    "surgery.xatl.training.module",  # XatlLM
    "surgery.ln_tune.lm",  # LNTuneLM
    "surgery.ln_tune.classify",  # SequenceClassifier
)


def import_recipe_modules() -> None:
    for name in RECIPE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a broken optional dependency: a recipe naming the class reports it when it is used
            pass


class RunCheckpoint(ModelCheckpoint):
    """Saves `<run_dir>/checkpoints/last.ckpt` every `every_n_train_steps` optimizer steps and once more when
    training ends (so `last.ckpt` of a finished run holds the exported model's final step, whatever
    `max_steps` is), atomically, with the torch RNG state (so dropout after a resume matches an uninterrupted run).

    Args:
        every_n_train_steps: steps between checkpoints (0 turns periodic checkpoints off).
        auto_resume: with no --ckpt_path, resume from `<run_dir>/checkpoints/last.ckpt` when it exists
            (False: refuse to start in a directory that holds an interrupted run).
        overwrite: start again in a run directory that holds a finished run (`metrics.json`); its
            `metrics.json` and `last.ckpt` are deleted first.
        accept_changes: resume even when the model, data or training settings differ from those the
            checkpoint was trained with (refused by default, naming each changed key); the changes are
            recorded in `<run_dir>/resume_changes.json` and `metrics.json`.
    """

    def __init__(self, every_n_train_steps: int = 100, auto_resume: bool = True, overwrite: bool = False,
                 accept_changes: bool = False):
        if every_n_train_steps < 0:
            raise SurgeryError(
                f"checkpoint.every_n_train_steps={every_n_train_steps} is negative: use a positive number of steps, or 0 for no periodic checkpoints"
            )
        super().__init__(every_n_train_steps=every_n_train_steps or None, save_last=True, save_top_k=0)
        self.auto_resume, self.overwrite, self.accept_changes = auto_resume, overwrite, accept_changes
        self.run_config: dict | None = None  # the run's parsed config, saved in each checkpoint to compare on resume
        self._saved_step: int | None = None  # global step of the last checkpoint this run wrote or resumed

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"  # stable when the checkpoint interval changes between runs

    def setup(self, trainer, pl_module, stage) -> None:
        self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_step = trainer.global_step if trainer.ckpt_path else None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:  # the last step: saved where periodic checkpoints are,
            self._save_last(trainer)  # so `--ckpt_path last` with a higher max_steps continues mid-epoch

    def on_train_end(self, trainer, pl_module) -> None:
        """Runs that end otherwise (max_epochs, max_time, a callback's stop) save their final step here. Lightning's
        own end-of-training save happens only when no checkpoint was written at all."""
        self._save_last(trainer)

    def _save_last(self, trainer) -> None:
        if trainer.fast_dev_run or self._saved_step == trainer.global_step:
            return
        self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(self.last_model_path, weights_only=False)  # a full training checkpoint, said explicitly

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rng": rng_state(), "config": self.run_config}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])


def keep_earlier_log(log_dir: Path) -> Path | None:
    """Lightning's CSV logger deletes `metrics.csv` when it starts; a resumed run first moves the
    interrupted run's log aside as `metrics.partN.csv` (N = 1, 2, ... in order of interruption)."""
    current = log_dir / "metrics.csv"
    if not current.exists():
        return None
    kept = log_dir / f"metrics.part{len(list(log_dir.glob('metrics.part*.csv'))) + 1}.csv"
    current.rename(kept)
    return kept


class SurgeryCLI(LightningCLI):
    def __init__(self, args=None):
        import_recipe_modules()
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # A one-line usage: the full option list would bury an error message (`--help` prints it).
            parser_kwargs={c: {"usage": RECIPE_USAGE.format(c)} for c in ("fit", "validate", "test", "predict")},
            args=None if args == sys.argv[1:] else args,  # Lightning warns when given the command line as args
            auto_configure_optimizers=False,
            parser_class=SurgeryArgumentParser,  # a refused recipe in one line, not jsonargparse's nested report
        )

    def instantiate_trainer(self, **kwargs):
        """With the progress bar on and none configured, `StepProgressBar` (steps out of max_steps; whole lines
        when stdout is not a terminal); with the model summary on and none configured, `ParamSummary` (no FLOPs
        column when they were not measured)."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer") or {}
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.append(ParamSummary())
            kwargs["enable_model_summary"] = False  # Lightning's own would be added beside it, with a notice saying so
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads an explicit --ckpt_path here (for its hyperparameters), before any of our checks.
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and path not in ("last", "best", "hpc", "registry") and not str(path).startswith("registry:"):
            read_training_checkpoint(path)
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        # jsonargparse reports a failed class as a long ValueError; users see our own message instead.
        try:
            super().instantiate_classes()
        except SurgeryError:
            raise
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, SurgeryError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportRun, "export")
        parser.add_lightning_class_args(PublishRun, "publish")  # after export: publishes the exported run
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(DivergenceGuard, "guard")
        # The data module owns the tokenizer; the model needs it for its vocabulary and its export.
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        check_trainer_config(trainer)
        if trainer.default_root_dir is None:
            trainer.default_root_dir = "runs/default"
        if self.subcommand == "fit":  # before the model loads: a second fit into a live run directory stops here
            run_lock.acquire(trainer.default_root_dir)
        if trainer.logger in (None, True):
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": trainer.default_root_dir, "name": "logs", "version": ""},
            }

    def before_fit(self) -> None:
        """Check the configuration (`surgery.training.validate`), decide what the run starts from (`surgery.training.resume`), load checkpoints weights-only."""
        check_fit(self.trainer, self.model, self.datamodule)
        if self.trainer.is_global_zero:
            warn_steps_beyond_run(self.config["fit"].as_dict(), self.trainer.max_steps)
        config = self.config_init["fit"]
        ckpt = next(cb for cb in self.trainer.callbacks if isinstance(cb, RunCheckpoint))
        run_dir = Path(self.trainer.default_root_dir)
        config["ckpt_path"] = choose_checkpoint(run_dir, config.get("ckpt_path"), ckpt.auto_resume, ckpt.overwrite)
        ckpt.run_config = plain(self.config["fit"].as_dict())
        if config["ckpt_path"] is not None:
            check_resume_config(config["ckpt_path"], read_training_checkpoint(config["ckpt_path"]), ckpt.run_config,
                                ckpt.accept_changes, run_dir)
            keep_earlier_log(run_dir / "logs")
        elif os.environ.get("LOCAL_RANK", "0") == "0":
            (run_dir / "resume_changes.json").unlink(missing_ok=True)  # left by an earlier run in this directory
        if config.get("weights_only") is None:
            config["weights_only"] = True
