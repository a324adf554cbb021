"""Which parameters LN-tuning trains: the gains and biases of every norm, plus an optional task head.

Names are full parameter names (`model.named_parameters()`), e.g. `transformer.h.0.ln_1.weight`.
For a family of `surgery.families` (GPT-2, GPT-NeoX, Llama-style) the norms are the ones the family
describes, in forward order; other models (BERT) are scanned for norm modules (`surgery.families.is_norm`).
A LayerNorm has a gain and a bias; an RMSNorm (Llama-style) has a gain only, so there "gains and biases"
means gains.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from surgery.errors import SurgeryError
from surgery.families import FAMILIES, Family, block_part_paths, family_of, is_norm, norm_paths
from surgery.models.ln_free import model_name

# Top-level modules that hold a task head in Hugging Face *ForSequenceClassification models.
HEAD_CANDIDATES = ("classifier", "score")
# Which norms train: every norm, or only those that feed attention (Zhao et al. 2024; `block_part_paths`' attn_norm).
NORM_SETS = ("all", "attn")


def registry_family(model: nn.Module) -> Family | None:
    """The `surgery.families` entry of a plain Hugging Face model of a described family, else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model, PreTrainedModel) and any(model_type in f.model_types for f in FAMILIES.values()):
        return family_of(model)
    return None


def _scan(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_norm(m) and any(True for _ in m.parameters(recurse=False))}


def _family_norms(model: nn.Module, family: Family) -> dict[str, nn.Module]:
    """The family's norms, checked against a scan by type: a norm the family does not describe is an error
    (LN-tuning would silently leave it frozen)."""
    described = {path: model.get_submodule(path) for path in norm_paths(model)}
    extra = [n for n in _scan(model) if n not in described]
    if extra:
        raise SurgeryError(
            f"model {model_name(model)!r} has norms the {family.name} family does not describe: {extra[:3]} "
            f"({len(extra)} in all); describe them in surgery/families.py before LN-tuning this model"
        )
    return {n: m for n, m in described.items() if any(True for _ in m.parameters(recurse=False))}


def norm_modules(model: nn.Module, norms: str = "all") -> dict[str, nn.Module]:
    """Every norm module with trainable affine parameters, by module name: a described family's norms in
    forward order (blocks' attention then MLP norms, then the final norm), otherwise in definition order.
    `norms="attn"` keeps only the norms that feed attention, block by block (`surgery.families.block_part_paths`).

    Refuses an LN-free model (every norm neutralised by a huge epsilon, measured by `surgery.models.ln_free`: our
    export or a published LN-free GPT-2, with or without `config.surgery_ln_free`), a partly converted one
    (naming the norms that still normalize), and a model with no norms at all.
    """
    from surgery.models.ln_free import detect_ln_free

    if detect_ln_free(model):
        raise SurgeryError(
            f"model {model_name(model)!r} is LN-free (every norm's per-token scale is fixed by a huge epsilon): its "
            "LayerNorms are fixed affine maps folded into the next layers, so there is nothing to LN-tune. "
            "LN-tune the model before removing LayerNorm, or use LoRA/BitFit on the LN-free model"
        )
    family = registry_family(model)
    found = _family_norms(model, family) if family else _scan(model)
    if not found:
        raise SurgeryError(
            f"model {model_name(model)!r} has no LayerNorm (no nn.LayerNorm, *LayerNorm or *RMSNorm module with "
            "parameters): LN-tuning needs norm gains and biases to train"
        )
    if norms not in NORM_SETS:
        raise SurgeryError(f"norms must be one of {', '.join(NORM_SETS)}, got {norms!r}")
    if norms == "attn":
        found = {path: found[path] for path in block_part_paths(model, "attn_norm") if path in found}
    return found


def norm_has_bias(model: nn.Module) -> bool:
    """Whether any of the model's norms has a bias (False for RMSNorm models, e.g. Llama-style)."""
    return any(getattr(m, "bias", None) is not None for m in norm_modules(model).values())


def ln_parameters(model: nn.Module, weights: bool = True, biases: bool = True, norms: str = "all"
                  ) -> dict[str, nn.Parameter]:
    """Norm gains (`weights`) and biases where the norms have them, by full parameter name, of the norms
    `norms` selects ("all", or "attn": those feeding attention).

    `biases=True` on a model whose norms have no bias (RMSNorm) selects its gains only; a selection that
    is empty (`weights=False` there, or both False) is an error, not a silent no-op.
    """
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in norm_modules(model, norms).items():
        for p_name, p in module.named_parameters(recurse=False):
            if (p_name == "bias" and biases) or (p_name != "bias" and weights):
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    if not out:
        if not (weights or biases):
            raise SurgeryError("weights=False and biases=False select no norm parameter: LN-tuning would train nothing")
        raise SurgeryError(
            f"model {model_name(model)!r} has norms without bias ({_kinds(model)}: gains only), so biases alone "
            "(weights=False) select nothing to train; train the gains (weights=True)"
        )
    return out


def _kinds(model: nn.Module) -> str:
    return ", ".join(sorted({type(m).__name__ for m in norm_modules(model).values()}))


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
        raise SurgeryError(f"head module(s) {missing} not found in {model_name(model)!r}; top-level modules: "
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
