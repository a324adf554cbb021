"""Messages libraries print on every `surgery` run that say nothing about the run, dropped by their exact text.

Installed by the `surgery` command only (a notebook importing surgery keeps every message):
- torch's FutureWarning about `isinstance(treespec, LeafSpec)`, raised inside Lightning's own pytree helper;
- Lightning's "💡 Tip:" lines advertising its cloud services;
- transformers' "`loss_type=None` was set in the config but it is unrecognized" (None is the default: the
  default causal-LM loss is what every model here uses).
"""

from __future__ import annotations

import logging
import warnings

_TIPS = ("💡 Tip: For seamless cloud",)
_TRANSFORMERS = ("`loss_type=None` was set in the config but it is unrecognized",)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_installed = False


def silence_known_noise() -> None:
    """Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    logging.getLogger("lightning.fabric.utilities.rank_zero").addFilter(_DropMessages(_TIPS))
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages(_TIPS))
    logging.getLogger("transformers.modeling_utils").addFilter(_DropMessages(_TRANSFORMERS))
