"""Turn a GPT-2's LayerNorms into switchable ones, and name the points a removal schedule acts on.

Point names: `h.{i}.ln_2` (MLP input), `h.{i}.ln_1_qk` and `h.{i}.ln_1_v` (attention input, query/key
and value paths, each its own LN), `ln_f` (final). After `prepare_for_removal`, a block's `ln_1` is an
Identity and its `c_attn` is a `SplitQKVInput` reading the residual stream through both ln_1 copies.
"""

from __future__ import annotations

from torch import nn

from surgery.errors import SurgeryError
from surgery.families import blocks, family_of, get_module, set_module
from surgery.remove_ln.fake_ln import SplitQKVInput, SwitchableLayerNorm, TokenContext

KINDS = ("ln_2", "ln_1_qk", "ln_1_v", "ln_f")  # removal order of the papers


def point_names(n_blocks: int) -> dict[str, list[str]]:
    """Point names by kind, block by block."""
    per_block = {k: [f"h.{i}.{k}" for i in range(n_blocks)] for k in KINDS[:3]}
    return {**per_block, "ln_f": ["ln_f"]}


def _as_layernorm(module: nn.Module, path: str) -> nn.LayerNorm:
    if isinstance(module, nn.LayerNorm):
        return module
    raise SurgeryError(
        f"{path} is a {type(module).__name__}, not a LayerNorm: this model has no LayerNorm there "
        "(already LN-free, or not prepared from a pretrained model); start from a model with its LayerNorms"
    )


def prepare_for_removal(model: nn.Module, momentum: float = 0.9) -> dict[str, SwitchableLayerNorm]:
    """Replace every LayerNorm of `model` (in place) by a real `SwitchableLayerNorm`; return them by point name.

    Behaviour is unchanged until a point goes fake (outputs equal to float rounding).
    """
    fam = family_of(model)
    context = TokenContext()
    points: dict[str, SwitchableLayerNorm] = {}
    for i, block in enumerate(blocks(model)):
        ln_1 = _as_layernorm(get_module(block, fam.attn_norm), f"{fam.blocks}.{i}.{fam.attn_norm}")
        ln_2 = _as_layernorm(get_module(block, fam.mlp_norm), f"{fam.blocks}.{i}.{fam.mlp_norm}")
        ln_qk = SwitchableLayerNorm(ln_1, context, momentum)
        ln_v = SwitchableLayerNorm(ln_1, context, momentum)
        set_module(block, fam.attn_in, SplitQKVInput(get_module(block, fam.attn_in), ln_qk, ln_v))
        set_module(block, fam.attn_norm, nn.Identity())
        points[f"h.{i}.ln_2"] = SwitchableLayerNorm(ln_2, context, momentum)
        set_module(block, fam.mlp_norm, points[f"h.{i}.ln_2"])
        points[f"h.{i}.ln_1_qk"], points[f"h.{i}.ln_1_v"] = ln_qk, ln_v
    ln_f = _as_layernorm(get_module(model, fam.final_norm), fam.final_norm)
    points["ln_f"] = SwitchableLayerNorm(ln_f, context, momentum)
    set_module(model, fam.final_norm, points["ln_f"])
    return points


def find_points(model: nn.Module) -> dict[str, SwitchableLayerNorm]:
    """The switchable LNs of a model already prepared by `prepare_for_removal`, by point name."""
    fam = family_of(model)
    points: dict[str, SwitchableLayerNorm] = {}
    for i, block in enumerate(blocks(model)):
        split = get_module(block, fam.attn_in)
        if not isinstance(split, SplitQKVInput):
            raise SurgeryError("model was not prepared for LayerNorm removal (no split Q/K/V input in block 0)")
        points[f"h.{i}.ln_2"] = get_module(block, fam.mlp_norm)
        points[f"h.{i}.ln_1_qk"], points[f"h.{i}.ln_1_v"] = split.ln_qk, split.ln_v
    points["ln_f"] = get_module(model, fam.final_norm)
    return points


def token_context(points: dict[str, SwitchableLayerNorm]) -> TokenContext:
    return next(iter(points.values())).context
