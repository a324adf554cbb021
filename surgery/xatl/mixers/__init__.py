"""The mixer registry: a name in a config or recipe -> a module class."""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from surgery.errors import SurgeryError
from surgery.xatl.mixers.linear_attention import GLAMixer, RetentionMixer
from surgery.xatl.mixers.mamba import MambaMixer
from surgery.xatl.mixers.mamba2 import Mamba2Mixer

MIXERS: dict[str, type[nn.Module]] = {"mamba": MambaMixer, "mamba2": Mamba2Mixer, "retention": RetentionMixer,
                                      "gla": GLAMixer}


def mixer_options(cls: type[nn.Module]) -> list[str]:
    """The settings a mixer class takes besides d_model and n_head (its __init__ and those it passes **kwargs to)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                  and p.name not in ("d_model", "n_head", *names)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def build_mixer(name: str, d_model: int, n_head: int, **options) -> nn.Module:
    """A fresh mixer of width `d_model`. `options` are the mixer's own settings (e.g. d_state for mamba);
    a name the mixer does not take is refused (SurgeryError), naming the ones it does."""
    if name not in MIXERS:
        raise SurgeryError(f"unknown mixer {name!r}; choose one of: {', '.join(sorted(MIXERS))}")
    cls = MIXERS[name]
    known = mixer_options(cls)
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SurgeryError(f"mixer_config key {key!r} is not a setting of mixer {name!r}{hint}; "
                               f"its settings: {', '.join(known)}")
    heads = {"n_head": n_head} if "n_head" in inspect.signature(cls.__init__).parameters else {}
    try:
        return cls(d_model=d_model, **heads, **options)
    except TypeError as err:
        raise SurgeryError(f"bad options for mixer {name!r}: {err}") from err
