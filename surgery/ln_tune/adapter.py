"""A fine-tuning run as a PEFT adapter that plain PEFT loads: `PeftModel.from_pretrained(base_model, dir)`.

    save_adapter(trained, "run/adapter", mask=mask, norms="attn")    # after LN-tuning `trained` in place

An LN-tuned plain model becomes a PEFT LN-tuning adapter (`LNTuningConfig`): a copy of every norm module LN-tuning
trained (for an entry subset, every norm with at least one selected entry; its other entries still equal the base,
since `EntryMask.restore` keeps them bit-identical) plus the task head as `modules_to_save`. A `PeftModel` (LoRA,
prefix-tuning and their `ln+` combinations) writes its own adapter. The merged plain model (`tune.export`) stays
the default export; the adapter holds only the trained modules (kilobytes for LN-tuning).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.params import head_modules, norm_modules


def trained_norms(model: nn.Module, norms: str = "all", mask: EntryMask | None = None) -> list[str]:
    """Module names of the norms a run trained: those of the norm set `norms` ("all" or "attn"), and with a mask,
    only those with at least one selected entry."""
    names = list(norm_modules(model, norms))
    if mask is None:
        return names
    touched = {n.rsplit(".", 1)[0] for n, m in mask.masks.items() if bool(m.any())}
    return [n for n in names if n in touched]


def ln_adapter(model: nn.Module, norms: list[str], head: str | list[str] | None = "auto"):
    """A PEFT LN-tuning model over a deep copy of `model` whose adapter holds `model`'s current `norms` (module
    names) and, as `modules_to_save`, its head modules."""
    from peft import LNTuningConfig, get_peft_model

    model = copy.deepcopy(model)
    config = LNTuningConfig(target_modules=list(norms), modules_to_save=head_modules(model, head) or None)
    return get_peft_model(model, config)


def save_adapter(model: nn.Module, out: str | Path, norms: str = "all", mask: EntryMask | None = None,
                 head: str | list[str] | None = "auto") -> Path:
    """Write `model` (a `PeftModel`, or a plain model LN-tuned in place with the norm set `norms` and `mask`) as a PEFT
    adapter directory (adapter_config.json, adapter_model.safetensors); returns `out`."""
    from peft import PeftModel

    out = Path(out)
    peft_model = model if isinstance(model, PeftModel) else ln_adapter(model, trained_norms(model, norms, mask), head)
    peft_model.save_pretrained(out)
    return out
