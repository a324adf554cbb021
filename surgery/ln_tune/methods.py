"""The fine-tuning methods compared against LN-tuning, each a function of a plain model.

    full        every parameter
    head        the task head only (a linear probe on the frozen encoder)
    bitfit      every bias plus the head (Ben Zaken et al. 2022); an error for models without biases (Llama-style)
    ln          norm gains and biases (RMSNorm: gains) plus the head (LN-tuning, Qi et al. 2022)
    ln-fisher   a Fisher-selected top share of LN entries plus the head (needs the Fisher scores)
    ln-random   a random share of LN entries plus the head (the control for ln-fisher)
    lora        PEFT LoRA on the attention projections (query and value; a fused Q/K/V projection whole),
                head trained fully
    ln-mask     LN entries of a saved mask (e.g. from another task) plus the head
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.params import (bias_parameters, head_modules, head_parameters, ln_parameters, registry_family,
                                    train_only)
from surgery.ln_tune.tune import LNTuneConfig, ln_tune

METHODS = ("full", "head", "bitfit", "ln", "ln-fisher", "ln-random", "lora", "ln-mask")
# Attention projections LoRA adapts, by model type, for models outside `surgery.families` (whose own
# Q/K/V description decides: `lora_targets`).
LORA_TARGETS = {"bert": ["query", "value"]}


def lora_targets(model: nn.Module) -> list[str]:
    """Module names LoRA adapts: a family's fused Q/K/V projection (c_attn, query_key_value), or its separate
    query and value projections (q_proj, v_proj), as in the LoRA paper; BERT's query and value."""
    family = registry_family(model)
    if family is not None:
        names = [path.rsplit(".", 1)[-1] for path in family.qkv]
        return [names[0], names[2]] if family.qkv_layout == "separate" else names
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LORA_TARGETS:
        raise SurgeryError(f"no LoRA target modules known for model type {model_type!r} "
                           f"(known: {list(LORA_TARGETS)} and the families of surgery.families)")
    return LORA_TARGETS[model_type]


def prepare(
    model: nn.Module,
    method: str,
    *,
    fraction: float = 0.1,
    head: str | list[str] | None = "auto",
    fisher: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
    mask: EntryMask | str | None = None,
    seed: int = 0,
    lora_r: int = 8,
    lora_alpha: int = 16,
) -> tuple[nn.Module, EntryMask | None]:
    """(model to train, mask to restore after each optimizer step or None). `fisher(model)` returns LN scores."""
    if method not in METHODS:
        raise SurgeryError(f"unknown fine-tuning method {method!r}; choose from {', '.join(METHODS)}")
    heads = head_parameters(model, head)
    if method == "full":
        train_only(model, {n for n, _ in model.named_parameters()})
        return model, None
    if method == "head":
        train_only(model, set(heads))
        return model, None
    if method == "bitfit":
        biases = bias_parameters(model)
        if not biases:
            raise SurgeryError(f"model type {getattr(model.config, 'model_type', None)!r} has no bias parameters "
                               "(Llama-style models have none): BitFit would train nothing but the head")
        train_only(model, set(biases) | set(heads))
        return model, None
    if method == "lora":
        return _lora(model, head, lora_r, lora_alpha), None
    if method == "ln-fisher":
        if fisher is None:
            raise SurgeryError("method 'ln-fisher' needs Fisher scores: pass fisher=<function of the model>")
        mask = EntryMask.top_k(fisher(model), fraction=fraction)
    elif method == "ln-random":
        mask = EntryMask.random({n: p.shape for n, p in ln_parameters(model).items()}, fraction=fraction, seed=seed)
    elif method == "ln-mask" and mask is None:
        raise SurgeryError("method 'ln-mask' needs a mask file (masks.safetensors of an earlier run)")
    return model, ln_tune(model, LNTuneConfig(head=head, mask=mask if method != "ln" else None))


def _lora(model: nn.Module, head, r: int, alpha: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(model),
                        modules_to_save=head_modules(model, head) or None)
    return get_peft_model(model, config)
