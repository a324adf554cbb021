"""The fine-tuning methods compared against LN-tuning, each a function of a plain model.

    full        every parameter
    head        the task head only (a linear probe on the frozen encoder)
    bitfit      every bias plus the head (Ben Zaken et al. 2022); an error for models without biases (Llama-style)
    ln          norm gains and biases (RMSNorm: gains) plus the head (LN-tuning, Qi et al. 2022)
    ln-attn     only the norms that feed attention plus the head (Zhao et al. 2024; `surgery.families.block_part_paths`)
    ln-fisher   a Fisher-selected top share of LN entries plus the head (needs the Fisher scores)
    ln-random   a random share of LN entries plus the head (the control for ln-fisher)
    ln-mask     LN entries of a saved mask (e.g. from another task) plus the head
    lora, lora-mlp, prefix, ln+lora, ln+lora-mlp, ln+prefix
                PEFT LoRA on the attention or the MLP projections, prefix-tuning, and each with every norm trained
                (`surgery.ln_tune.combine`); head trained fully
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import is_norm
from surgery.ln_tune.combine import PEFT_METHODS, peft_method
from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.params import bias_parameters, head_parameters, ln_parameters, train_only
from surgery.ln_tune.tune import LNTuneConfig, ln_tune

METHODS = ("full", "head", "bitfit", "ln", "ln-attn", "ln-fisher", "ln-random", "ln-mask") + PEFT_METHODS


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
    prefix_tokens: int = 8,
) -> tuple[nn.Module, EntryMask | None]:
    """(model to train, mask to restore after each optimizer step or None). `fisher(model)` returns LN scores.
    A PEFT method returns the `PeftModel` wrapping `model`; the others change `model` in place."""
    if method not in METHODS:
        raise SurgeryError(f"unknown fine-tuning method {method!r}; choose from {', '.join(METHODS)}")
    if method in PEFT_METHODS:
        return peft_method(model, method, head, lora_r=lora_r, lora_alpha=lora_alpha, prefix_tokens=prefix_tokens), None
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
    if method == "ln-fisher":
        if fisher is None:
            raise SurgeryError("method 'ln-fisher' needs Fisher scores: pass fisher=<function of the model>")
        mask = EntryMask.top_k(fisher(model), fraction=fraction)
    elif method == "ln-random":
        mask = EntryMask.random({n: p.shape for n, p in ln_parameters(model).items()}, fraction=fraction, seed=seed)
    elif method == "ln-mask" and mask is None:
        raise SurgeryError("method 'ln-mask' needs a mask file (masks.safetensors of an earlier run)")
    norms = "attn" if method == "ln-attn" else "all"
    return model, ln_tune(model, LNTuneConfig(head=head, mask=mask if method not in ("ln", "ln-attn") else None,
                                              norms=norms))


def optimizer_groups(model: nn.Module, lr: float, norm_lr: float | None = None) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: the norms' (PEFT copies included) at `norm_lr`, the rest
    at `lr`, so a combination can give LN-tuning its own rate (it wants 1e-3..1e-2); norm_lr None: one rate."""
    norm_ids = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    norms = [p for p in trainable if id(p) in norm_ids]
    others = [p for p in trainable if id(p) not in norm_ids]
    rate = lr if norm_lr is None else norm_lr
    return [g for g in ({"params": others, "lr": lr}, {"params": norms, "lr": rate}) if g["params"]]
