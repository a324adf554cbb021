"""Messages libraries print on every `surgery` run that say nothing about the run, dropped by their exact text.

Installed by the `surgery` command only (a notebook importing surgery keeps every message):
- torch's FutureWarning about `isinstance(treespec, LeafSpec)`, raised inside Lightning's own pytree helper;
- Lightning's "💡 Tip:" lines advertising its cloud services;
- Lightning's "LightningCLI's args parameter is intended to run from within Python": `surgery` passes the command
  line on purpose, after resolving shipped recipe paths in it;
- Lightning's "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used." and its siblings for the other
  `limit_*_batches` and `val_check_interval` set to 1 or 1.0: they repeat the recipe;
- Lightning's "TPU available: False, using: 0 TPU cores" (the GPU line, which says what the run uses, stays);
- transformers' "`loss_type=None` was set in the config but it is unrecognized" (None is the default: the
  default causal-LM loss is what every model here uses);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (its optional CPU kernel for 4-bit
  matrices, which no surgery uses; peft imports bitsandbytes for LN-tuning).

When stderr is not a terminal (a log file, a pipe), other libraries' progress bars (transformers' "Loading
weights", the data module's "tokenizing", ...) are turned off through tqdm's documented `TQDM_DISABLE` and
huggingface_hub's `HF_HUB_DISABLE_PROGRESS_BARS` variables, unless the environment sets them: redrawn bars leave
carriage returns in a log. The training progress of `surgery fit` prints whole lines there instead
(`surgery.training.progress.StepProgressBar`).

Every other warning and log message passes: the filters match the start of a message, never a logger as a whole.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

_LIGHTNING = (
    "💡 Tip: For seamless cloud",
    "TPU available: False, using: 0 TPU cores",
)
_LIGHTNING_PATTERNS = (re.compile(r"`Trainer\((limit_(train|val|test|predict)_batches|val_check_interval)=1(\.0)?\)` was configured so "),)
_TRANSFORMERS = ("`loss_type=None` was set in the config but it is unrecognized",)
_BITSANDBYTES = ("Failed to load CPU gemm_4bit_forward from kernels-community",)
# (message regex, category) of warnings.warn calls
_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning),
)
_QUIET_BARS_ENV = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...], patterns: tuple[re.Pattern, ...] = ()):
        super().__init__()
        self.starts, self.patterns = starts, patterns

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith(self.starts) or any(p.match(msg) for p in self.patterns))


_installed = False


def silence_known_noise() -> None:
    """Idempotent. Imports none of the libraries it quiets (`surgery --help` stays light)."""
    global _installed
    ignore_known_warnings()  # every call: whoever resets the warning filters (pytest does, per test) loses them
    if _installed:
        return
    _installed = True
    lightning = _DropMessages(_LIGHTNING, _LIGHTNING_PATTERNS)
    logging.getLogger("lightning.fabric.utilities.rank_zero").addFilter(lightning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lightning)
    logging.getLogger("transformers.modeling_utils").addFilter(_DropMessages(_TRANSFORMERS))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages(_BITSANDBYTES))
    if not _is_terminal(sys.stderr) and not any(name in os.environ for name in _QUIET_BARS_ENV):
        for name in _QUIET_BARS_ENV:  # read when tqdm and huggingface_hub are imported, which happens later
            os.environ[name] = "1"


def ignore_known_warnings() -> None:
    """The `warnings.warn` part alone, ahead of the current filters (a filter added twice is kept once)."""
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
