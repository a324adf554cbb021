"""What a person reads from `surgery`: the help of `fit` and `export`, the error for a command line with no recipe,
the warning for settings the run never reaches, the messages dropped as noise, and (slow) every line a shortened
quick-start run prints when its output goes to a log, checked against a list of the lines allowed."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest

from surgery.cli import quiet
from surgery.cli.entry import main
from surgery.training.progress import StepProgressBar, format_summary
from surgery.training.validate import steps_beyond_run, warn_steps_beyond_run

ROOT = Path(__file__).resolve().parents[1]
RECIPE_MODULES = ["surgery.training.lm.CausalLM", "surgery.remove_ln.module.LNRemoval", "surgery.xatl.training.module.XatlLM",
                  "surgery.ln_tune.lm.LNTuneLM", "surgery.ln_tune.classify.SequenceClassifier"]


def help_text(capsys, monkeypatch, argv: list[str]) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # class paths on lines of their own, not broken mid-name
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None)
    return " ".join(capsys.readouterr().out.split())


# -- help ----------------------------------------------------------------------------------------------------
def test_fit_help_lists_the_recipe_modules(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, ["fit", "--help"])
    known = re.search(r"for any subclass of LightningModule\. .*?known subclasses: ([^)]*)\)", text)
    assert known, text[:2000]
    listed = [name.strip() for name in known.group(1).split(",")]
    assert all(name in listed for name in RECIPE_MODULES), listed


def test_model_help_spells_options_as_recipes_do(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, ["fit", "--model.help", "LNRemoval"])  # found by class name
    assert "Help for --model.help=surgery.remove_ln.module.LNRemoval" in text
    assert "--model.init_args.lr LR" in text and "--model.init_args.schedule.help" in text
    assert not re.search(r"--model\.(?!init_args\.|help\b)", text), text[:500]
    nested = help_text(capsys, monkeypatch, ["fit", "--model.help", "LNRemoval", "--model.init_args.schedule.help"])
    assert "--model.init_args.schedule.start START" in nested and "--model.init_args.schedule.gaps GAPS" in nested


def test_export_help_says_a_mid_removal_checkpoint_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LN-free after a finished LayerNorm removal; a checkpoint taken mid-removal (some norms still real) is refused" in text
    assert "LN-free when removal finished" not in text


# -- no recipe -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["fit"], ["fit", "--trainer.max_steps", "3"], ["validate"]])
def test_a_command_line_without_a_recipe_asks_for_one(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"usage: surgery {argv[0]} --config RECIPE.yaml [--key value ...]",
                                f"surgery {argv[0]}: error: no recipe given: pass --config RECIPE.yaml, e.g. "
                                "recipes/remove_ln/quickstart.yaml"]


def test_a_recipe_without_a_model_says_so(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer:\n  max_steps: 3\ndata:\n  class_path: surgery.data.TokenBlocks\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe)])
    assert exit_.value.code == 2
    assert ("surgery fit: error: the recipe sets no model: a recipe names each of model and data by class_path"
            in capsys.readouterr().err)


# -- settings beyond max_steps -------------------------------------------------------------------------------
CONFIG = {"trainer": {"max_steps": 60},
          "model": {"class_path": "x.Y", "init_args": {"lr": 1e-3, "warmup_steps": 80, "keep_ln": True, "step": 30,
                                                       "unfreeze": {"step": 40, "warmup_steps": 100, "threshold": 500},
                                                       "schedule": {"start": 90, "gaps": {"ln_2": 70}}}},
          "guard": {"warmup_steps": 100}, "checkpoint": {"every_n_train_steps": 100}}


def test_settings_counted_in_steps_beyond_the_run_are_found_by_name():
    assert steps_beyond_run(CONFIG, 60) == [("model.init_args.warmup_steps", 80), ("model.init_args.unfreeze.warmup_steps", 100)]
    assert steps_beyond_run(CONFIG, 100) == []
    assert steps_beyond_run(CONFIG, -1) == []  # epochs bound the run
    assert steps_beyond_run({"model": {"class_path": "x.Y", "init_args": {"warmup_steps": True}}}, 0) == []


def test_the_warning_names_each_setting_against_max_steps(capsys):
    warn_steps_beyond_run(CONFIG, 60)
    assert capsys.readouterr().err == (
        "surgery fit: warning: model.init_args.warmup_steps=80, model.init_args.unfreeze.warmup_steps=100 exceed "
        "trainer.max_steps=60: the run ends before they take full effect; raise trainer.max_steps or lower them\n")
    warn_steps_beyond_run(CONFIG, 90)
    assert capsys.readouterr().err.startswith("surgery fit: warning: model.init_args.unfreeze.warmup_steps=100 exceeds "
                                              "trainer.max_steps=90: the run ends before it takes full effect;")
    assert warn_steps_beyond_run(CONFIG, 100) == [] and capsys.readouterr().err == ""


# -- noise ---------------------------------------------------------------------------------------------------
class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("logger, noise, kept", [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
     "you already `pip install kernels` and the kernels >= 0.11.1", "Failed to load the CPU bitsandbytes library"),
    ("lightning.pytorch.utilities.rank_zero", "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used.",
     "`Trainer.fit` stopped: `max_steps=60` reached."),
    ("lightning.pytorch.utilities.rank_zero", "`Trainer(val_check_interval=1.0)` was configured so validation will run "
     "at the end of the training epoch..", "GPU available: False, used: False"),
    ("lightning.pytorch.utilities.rank_zero", "TPU available: False, using: 0 TPU cores", "TPU available: True, using: 0 TPU cores"),
    ("transformers.modeling_utils", "`loss_type=None` was set in the config but it is unrecognized. Using the default loss: "
     "`ForCausalLMLoss`.", "Some weights of the model checkpoint were not used"),
])
def test_known_noise_is_dropped_and_real_messages_pass(logger, noise, kept):
    quiet.silence_known_noise()
    log, records = logging.getLogger(logger), Records()
    level = log.level
    log.setLevel(logging.WARNING)  # another test may have quietened the library's loggers (transformers' verbosity)
    log.addHandler(records)
    try:
        log.warning(noise, "No module named 'kernels'") if "%s" in noise else log.warning(noise)
        log.warning(kept)
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    assert records.messages == [kept]


def test_lightning_cli_args_notice_is_dropped_and_other_warnings_pass():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.ignore_known_warnings()
        warnings.warn("LightningCLI's args parameter is intended to run from within Python like if it were from the "
                      "command line. To prevent mistakes ...", UserWarning)
        warnings.warn("The dataloader does not have many workers", UserWarning)
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers"]


class Terminal:
    def isatty(self) -> bool:
        return True


def test_the_bar_prints_whole_lines_only_when_stdout_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert StepProgressBar().log_lines is False
    monkeypatch.setattr(sys, "stdout", open(os.devnull, "w"))
    assert StepProgressBar().log_lines is True
    assert StepProgressBar(log_lines=False).log_lines is False


def test_the_model_summary_leaves_out_flops_that_were_not_measured():
    columns = [(" ", ["0"]), ("Name", ["model"]), ("Type", ["GPT2LMHeadModel"]), ("Params", ["1.4 M"]), ("Mode", ["train"]),
               ("FLOPs", ["0"])]
    text = format_summary(columns, 1_400_000, 1_400_000, 5.6, {"train": 60, "eval": 0}, total_flops=0)
    assert "FLOPs" not in text and "Flops" not in text
    assert text.splitlines()[0].split("|")[1:] == [" Name  ", " Type            ", " Params ", " Mode"]
    assert "1.4 M      Trainable params" in text and "60         Modules in train mode" in text
    measured = format_summary([*columns[:-1], ("FLOPs", ["12.0 B"])], 1_400_000, 1_400_000, 5.6, {"train": 60, "eval": 0},
                              total_flops=12_000_000_000)
    assert "| FLOPs" in measured and "12.0 B     Total FLOPs" in measured


# -- a whole run, as a log records it ------------------------------------------------------------------------
BOX = "┏┓┗┛┃━┳┻╋┡┩│─┼┴┬└┘┌┐├┤╇╈╀╁┠┨┯┷ "
NUM = r"[\d.]+ ?[KMGT]?"
ALLOWED = [
    r"",
    r"surgery: \S+ is not in the current directory \(.*\); using the copy shipped with surgery: \S+",
    r"Seed set to 0",
    r"GPU available: False, used: False",
    # the model summary
    r" *\| Name +\| Type +\| Params +\| Mode",
    r"-+",
    rf"\d+ \| \w+ +\| \w+ +\| {NUM} *\| (train|eval)",
    rf"{NUM} +(Trainable params|Non-trainable params|Total params|Total estimated model params size \(MB\)|"
    r"Modules in train mode|Modules in eval mode)",
    # the settings the run never reaches: once
    r"surgery fit: warning: model\.init_args\.warmup_steps=20 exceeds trainer\.max_steps=16: the run ends before it "
    r"takes full effect; raise trainer\.max_steps or lower it",
    # training progress, as whole lines
    r"epoch 0, steps: +\d+% \| \d+/16 \[\d\d:\d\d<(\d\d:\d\d|\?), +([\d.]+it/s|[\d.]+s/it|\?it/s)(, train/loss=[\d.]+)?"
    r"(, val/loss=[\d.]+)?\]",
    r"`Trainer\.fit` stopped: `max_steps=16` reached\.",
    # the results table
    r" *LayerNorm removal: [\w ,()-]+",
    rf"[{BOX}]+",
    r"[┃│] .+ [┃│] .* [┃│]",
    r" *training loss: .+",
    r"exported \S+/run/model \| val loss [\d.]+ nats/token \| metrics in \S+/run/metrics\.json",
]


def short_corpus(path: Path) -> Path:
    paragraphs = [p for p in (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


@pytest.mark.slow
def test_the_quick_start_prints_no_noise_into_a_log(tmp_path):
    """recipes/remove_ln/quickstart.yaml, 16 steps on a small corpus with all 13 removals by step 13 (~15 s), run from
    another directory with stdout and stderr going to pipes: every line is one a person needs, and no bar redraws."""
    args = ["fit", "--config", "recipes/remove_ln/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.max_steps", "16", "--trainer.val_check_interval", "8", "--trainer.limit_val_batches", "1",
            "--model.init_args.schedule.start", "1",
            "--model.init_args.schedule.gaps", "{ln_2: 1, ln_1_qk: 1, ln_1_v: 1, ln_f: 1}",
            "--model.init_args.warmup_steps", "20",  # beyond the run: the warning
            "--data.init_args.data", str(short_corpus(tmp_path / "corpus.jsonl")), "--data.init_args.block_size", "32",
            "--data.init_args.batch_size", "4", "--data.init_args.val_fraction", "0.2",
            "--checkpoint.every_n_train_steps", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.update(OMP_NUM_THREADS="1", SURGERY_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    script = Path(sys.executable).with_name("surgery")  # the console script a person runs (`python -m
    # surgery.cli.entry` adds runpy's warning that the module was imported by its package first)
    command = [str(script)] if script.is_file() else [sys.executable, "-c", "import sys; from surgery.cli import main; sys.exit(main())"]
    run = subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stdout + run.stderr and "\x1b" not in run.stdout + run.stderr  # no redrawn bars, no escapes
    lines = (run.stdout + run.stderr).splitlines()
    noise = [line for line in lines if not any(re.fullmatch(p, line.rstrip()) for p in ALLOWED)]
    assert not noise, "\n".join(noise)
    progress = [line for line in run.stdout.splitlines() if line.startswith("epoch 0, steps:")]
    assert progress[0].startswith("epoch 0, steps:   0% | 0/16 ") and "| 16/16 [" in progress[-1]
    assert len(progress) <= 12 and "val/loss=" in progress[-1]
    assert sum("surgery fit: warning:" in line for line in lines) == 1
    assert any(line.startswith("exported ") for line in lines) and any("Trainable params" in line for line in lines)
