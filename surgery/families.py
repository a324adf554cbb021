"""Where each model family keeps its norms, attention, MLP and embeddings.

Every surgery reads module locations from here instead of hard-coding attribute paths, so a new
family (GPT-NeoX, Llama-style) is one more `Family` entry, not an edit to each surgery.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from surgery.errors import SurgeryError


@dataclass(frozen=True)
class Family:
    """Dotted attribute paths, relative to the model (or to a block where noted)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # the ModuleList of transformer blocks
    attn_norm: str  # the norm before attention, relative to a block
    mlp_norm: str  # the norm before the MLP, relative to a block
    attn: str  # relative to a block
    mlp: str  # relative to a block
    attn_in: str  # the fused Q/K/V input projection, relative to a block
    mlp_in: str  # the MLP's input projection, relative to a block
    final_norm: str
    tok_emb: str
    pos_emb: str | None
    lm_head: str
    norm_types: tuple[type[nn.Module], ...] = (nn.LayerNorm,)


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    attn="attn",
    mlp="mlp",
    attn_in="attn.c_attn",
    mlp_in="mlp.c_fc",
    final_norm="transformer.ln_f",
    tok_emb="transformer.wte",
    pos_emb="transformer.wpe",
    lm_head="lm_head",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2,)}


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face model, from `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise SurgeryError(
        f"model type {model_type!r} is not supported (known: {', '.join(known)}); "
        "add a Family entry in surgery/families.py to support it"
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def blocks(model: nn.Module) -> nn.ModuleList:
    return get_module(model, family_of(model).blocks)


def norm_paths(model: nn.Module) -> list[str]:
    """Dotted paths of every norm, in forward order: block by block, then the final norm."""
    fam = family_of(model)
    paths = [f"{fam.blocks}.{i}.{n}" for i in range(len(blocks(model))) for n in (fam.attn_norm, fam.mlp_norm)]
    return paths + [fam.final_norm]
