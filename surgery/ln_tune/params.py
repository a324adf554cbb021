"""Which parameters LN-tuning trains: the gains and biases of every LayerNorm, plus an optional task head.

Names are full parameter names (`model.named_parameters()`), e.g. `transformer.h.0.ln_1.weight`.
"""

from __future__ import annotations

from torch import nn

from surgery.errors import SurgeryError

# Norm classes recognised by type; other families' norms are recognised by class name.
NORM_NAME_SUFFIXES = ("LayerNorm", "RMSNorm")
# Top-level modules that hold a task head in Hugging Face *ForSequenceClassification models.
HEAD_CANDIDATES = ("classifier", "score")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(NORM_NAME_SUFFIXES)


def _model_name(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm module with trainable affine parameters, by module name, in definition order.

    Refuses an LN-free model (every norm neutralised by a huge epsilon, measured by `surgery.ln_free`: our
    export or a published LN-free GPT-2, with or without `config.surgery_ln_free`), a partly converted one
    (naming the norms that still normalize), and a model with no norms at all.
    """
    from surgery.ln_free import detect_ln_free

    if detect_ln_free(model):
        raise SurgeryError(
            f"model {_model_name(model)!r} is LN-free (every norm's per-token scale is fixed by a huge epsilon): its "
            "LayerNorms are fixed affine maps folded into the next layers, so there is nothing to LN-tune. "
            "LN-tune the model before removing LayerNorm, or use LoRA/BitFit on the LN-free model"
        )
    found = {n: m for n, m in model.named_modules() if _is_norm(m) and any(True for _ in m.parameters(recurse=False))}
    if not found:
        raise SurgeryError(
            f"model {_model_name(model)!r} has no LayerNorm (no nn.LayerNorm, *LayerNorm or *RMSNorm module with "
            "parameters): LN-tuning needs norm gains and biases to train"
        )
    return found


def ln_parameters(model: nn.Module, weights: bool = True, biases: bool = True) -> dict[str, nn.Parameter]:
    """LayerNorm gains (`weights`) and biases, by full parameter name."""
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in norm_modules(model).items():
        for p_name, p in module.named_parameters(recurse=False):
            if (p_name == "bias" and biases) or (p_name != "bias" and weights):
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return out


def head_modules(model: nn.Module, head: str | list[str] | None = "auto") -> list[str]:
    """Module names of the task head. "auto": `classifier` or `score` where the model has one; None or []: no head."""
    if head is None:
        return []
    names = dict(model.named_modules())
    if head == "auto":
        return [n for n in HEAD_CANDIDATES if n in names]
    head = [head] if isinstance(head, str) else list(head)
    missing = [h for h in head if h not in names]
    if missing:
        raise SurgeryError(f"head module(s) {missing} not found in {_model_name(model)!r}; top-level modules: "
                           f"{[n for n, _ in model.named_children()]}")
    return head


def head_parameters(model: nn.Module, head: str | list[str] | None = "auto") -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for mod_name in head_modules(model, head):
        for p_name, p in model.get_submodule(mod_name).named_parameters():
            out[f"{mod_name}.{p_name}"] = p
    return out


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every bias of the model (BitFit), by full parameter name."""
    return {n: p for n, p in model.named_parameters() if n.endswith("bias")}


def train_only(model: nn.Module, names: set[str]) -> int:
    """Freeze every parameter except `names`; returns the number of trainable entries.

    Tied parameters (one tensor under two names) are trainable if either name is listed.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = names - set(params)
    if unknown:
        raise SurgeryError(f"no such parameters in the model: {sorted(unknown)[:5]}")
    keep = {id(params[n]) for n in names}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
