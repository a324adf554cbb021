"""LN-tuning as a surgery on a plain Hugging Face model: train only norm gains and biases (LayerNorm;
an RMSNorm has gains only), optionally only a masked subset of their entries, plus an optional task head.

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    mask = ln_tune(model, LNTuneConfig(mask="run/masks.safetensors"))   # or LNTuneConfig() for all LN entries
    ... train; after each optimizer step: mask.restore(model) ...
    export(model).save_pretrained(out)                                  # a plain model, no surgery code needed

The model is changed in place (only `requires_grad` flags and gradient hooks), so the trained model
already is the merged model. `peft_ln_tuning` gives the same training through PEFT's `LNTuningConfig`
(whole LayerNorm modules only; PEFT cannot mask entries); `export` merges it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from surgery.errors import SurgeryError
from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.params import head_modules, head_parameters, ln_parameters, norm_modules, train_only


@dataclass
class LNTuneConfig:
    """head: task-head modules that train fully ("auto": `classifier`/`score` if present; None: none).
    weights, biases: which norm parameters train. `biases=True` means "where the norms have them": an
        RMSNorm model (Llama-style) trains its gains, so one config serves every family; selecting nothing
        (`weights=False` on an RMSNorm model) is an error.
    mask: an `EntryMask` or the path of a saved one; only its True entries train. It may name only the norm
        parameters `weights`/`biases` select (a mask cannot unfreeze any other tensor).
    norms: "all" norms, or "attn": only those feeding attention (Zhao et al. 2024; GPT-2 `ln_1`, GPT-NeoX and
        Llama `input_layernorm`, BERT `attention.output.LayerNorm`)."""

    head: str | list[str] | None = "auto"
    weights: bool = True
    biases: bool = True
    mask: EntryMask | str | Path | None = None
    norms: str = "all"


def ln_tune(model: nn.Module, config: LNTuneConfig | None = None) -> EntryMask:
    """Freeze all but norm parameters (and the head); returns the mask in force, already applied.

    Without a mask, the returned mask selects every LN entry (its `restore` is then a no-op).
    Raises `SurgeryError` for a model without norms (e.g. an LN-free export), for an empty selection and
    for a mask naming parameters outside the selection.
    """
    config = config or LNTuneConfig()
    ln = ln_parameters(model, config.weights, config.biases, config.norms)
    train_only(model, set(ln) | set(head_parameters(model, config.head)))
    mask = config.mask
    if mask is None:
        import torch

        mask = EntryMask({n: torch.ones(p.shape, dtype=torch.bool) for n, p in ln.items()}, {"selection": "all"})
    elif not isinstance(mask, EntryMask):
        mask = EntryMask.load(mask)
    mask.check(model)
    outside = [n for n in mask.masks if n not in ln]
    if outside:
        raise SurgeryError(f"the mask names parameters LN-tuning does not train here: {outside[:3]} ({len(outside)} "
                           f"in all); it may name only the norm parameters selected (weights={config.weights}, "
                           f"biases={config.biases}, norms={config.norms!r})")
    return mask.apply(model)


def trainable_parameters(model: nn.Module, mask: EntryMask | None = None) -> int:
    """Entries training can change: all entries of trainable parameters, counting masked ones as selected."""
    params = dict(model.named_parameters())
    masked = set(mask.masks) if mask is not None else set()
    total = sum(p.numel() for n, p in params.items() if p.requires_grad and n not in masked)
    return total + (sum(int(mask.masks[n].sum()) for n in masked if params[n].requires_grad) if mask else 0)


def peft_ln_tuning(model: nn.Module, head: str | list[str] | None = "auto"):
    """The same LN-tuning through PEFT: `get_peft_model` with `LNTuningConfig` on every norm module."""
    from peft import LNTuningConfig, get_peft_model

    heads = head_modules(model, head)
    config = LNTuningConfig(target_modules=list(norm_modules(model)), modules_to_save=heads or None)
    return get_peft_model(model, config)


def export(model: nn.Module) -> nn.Module:
    """A plain `transformers` model with the tuned values in place: merges a PEFT wrapper, drops nothing else.
    Prefix-tuning adds keys and values no weight can hold: its `PeftModel` is returned as it is (it saves an adapter)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if isinstance(model, PeftModel):
        if model.peft_config[model.active_adapter].is_prompt_learning:
            return model
        model = model.merge_and_unload()
    _unwrap_modules_to_save(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _unwrap_modules_to_save(model: nn.Module) -> None:
    """PEFT's LN-tuning unload keeps `modules_to_save` wrappers (LoRA's removes them): put the trained copy in place."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        return
    from surgery.families import set_module

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapter
            set_module(model, name, module.modules_to_save[active if isinstance(active, str) else active[0]])
