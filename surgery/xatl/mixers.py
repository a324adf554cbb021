"""The mixer registry: a name in a config or recipe -> a module class."""

from __future__ import annotations

from torch import nn

from surgery.errors import SurgeryError
from surgery.xatl.linear_attention import GLAMixer, RetentionMixer
from surgery.xatl.mamba import MambaMixer

MIXERS: dict[str, type[nn.Module]] = {"mamba": MambaMixer, "retention": RetentionMixer, "gla": GLAMixer}


def build_mixer(name: str, d_model: int, n_head: int, **options) -> nn.Module:
    """A fresh mixer of width `d_model`. `options` are the mixer's own settings (e.g. d_state for mamba)."""
    if name not in MIXERS:
        raise SurgeryError(f"unknown mixer {name!r}; choose one of: {', '.join(sorted(MIXERS))}")
    try:
        return MIXERS[name](d_model=d_model, n_head=n_head, **options)
    except TypeError as err:
        raise SurgeryError(f"bad options for mixer {name!r}: {err}") from err
