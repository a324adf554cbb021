"""Turn a model's norms into switchable ones, and name the points a removal schedule acts on.

Point names are the same for every family: `h.{i}.ln_2` (the MLP norm), `h.{i}.ln_1_qk` and `h.{i}.ln_1_v`
(the attention norm's query/key and value paths, each its own copy), `ln_f` (the final norm). After
`prepare_for_removal`, a block's attention norm is an `AttnInputNorms` holding both copies, and its attention
input projection(s) read the residual stream through them (`surgery.remove_ln.split_input`).
"""

from __future__ import annotations

from torch import nn

from surgery.errors import SurgeryError
from surgery.families import Family, blocks, family_of, get_module, norm_kind, set_module
from surgery.remove_ln.fake_ln import SwitchableLayerNorm, TokenContext
from surgery.remove_ln.split_input import AttnInputNorms, NormedInput, SplitQKVInput

KINDS = ("ln_2", "ln_1_qk", "ln_1_v", "ln_f")  # removal order of the papers


def point_names(n_blocks: int) -> dict[str, list[str]]:
    """Point names by kind, block by block."""
    per_block = {k: [f"h.{i}.{k}" for i in range(n_blocks)] for k in KINDS[:3]}
    return {**per_block, "ln_f": ["ln_f"]}


def _as_norm(module: nn.Module, path: str, fam: Family) -> nn.Module:
    """The family's norm at `path`, or a SurgeryError saying what stands there instead."""
    expected = "an RMSNorm" if fam.norm_kind == "rmsnorm" else "a LayerNorm"
    if isinstance(module, (SwitchableLayerNorm, AttnInputNorms)):
        raise SurgeryError(f"{path} is already prepared for removal: start from the pretrained model, not a removal run's")
    ok = norm_kind(module) == fam.norm_kind
    if not ok:
        raise SurgeryError(
            f"{path} is a {type(module).__name__}, not {expected}: this model has no norm there "
            "(already LN-free, or not a pretrained model of its family); start from a model with its norms"
        )
    return module


def _refuse_fixed_norms(model: nn.Module) -> None:
    """A norm already neutralised (an LN-free model, ours or a published one) has nothing left to remove."""
    from surgery.models.ln_free import scan_norms

    if any(isinstance(m, (SwitchableLayerNorm, AttnInputNorms)) for m in model.modules()):
        return  # `_as_norm` names the prepared module
    fixed = scan_norms(model).fixed
    if fixed:
        raise SurgeryError(
            f"{len(fixed)} norm(s) of this model are already neutralised (their per-token scale is fixed by a huge "
            f"epsilon: {', '.join(fixed[:3])}...): it is already LN-free, there is nothing to remove. "
            "Start from the original pretrained model"
        )


def _projection(block: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return get_module(block, path)
    except AttributeError:
        raise SurgeryError(
            f"{where} has no attention input projection {path} (a hybrid's mixer layer?): norm removal works on "
            "models whose every block is attention + MLP; remove the norms of the source model before any transfer"
        ) from None


def prepare_for_removal(model: nn.Module, momentum: float = 0.9) -> dict[str, SwitchableLayerNorm]:
    """Replace every norm of `model` (in place) by a real `SwitchableLayerNorm`; return them by point name.

    Behaviour is unchanged until a point goes fake (outputs equal to float rounding).
    """
    fam = family_of(model)
    _refuse_fixed_norms(model)
    context = TokenContext()
    points: dict[str, SwitchableLayerNorm] = {}
    for i, block in enumerate(blocks(model)):
        where = f"{fam.blocks}.{i}"
        attn_norm = _as_norm(get_module(block, fam.attn_norm), f"{where}.{fam.attn_norm}", fam)
        mlp_norm = _as_norm(get_module(block, fam.mlp_norm), f"{where}.{fam.mlp_norm}", fam)
        norms = AttnInputNorms(SwitchableLayerNorm(attn_norm, context, momentum), SwitchableLayerNorm(attn_norm, context, momentum))
        norms.train(attn_norm.training)  # new modules start in training mode; keep the model's mode
        set_module(block, fam.attn_norm, norms)
        if fam.qkv_layout == "separate":
            for path, which in zip(fam.qkv, ("qk", "qk", "v")):
                proj = _projection(block, path, where)
                set_module(block, path, NormedInput(proj, norms, which).train(proj.training))
        else:
            proj = _projection(block, fam.qkv[0], where)
            set_module(block, fam.qkv[0], SplitQKVInput(proj, norms, fam.value_outputs(model.config)).train(proj.training))
        points[f"h.{i}.ln_2"] = SwitchableLayerNorm(mlp_norm, context, momentum).train(mlp_norm.training)
        set_module(block, fam.mlp_norm, points[f"h.{i}.ln_2"])
        points[f"h.{i}.ln_1_qk"], points[f"h.{i}.ln_1_v"] = norms.ln_qk, norms.ln_v
    final = _as_norm(get_module(model, fam.final_norm), fam.final_norm, fam)
    points["ln_f"] = SwitchableLayerNorm(final, context, momentum).train(final.training)
    set_module(model, fam.final_norm, points["ln_f"])
    return points


def find_points(model: nn.Module) -> dict[str, SwitchableLayerNorm]:
    """The switchable norms of a model already prepared by `prepare_for_removal`, by point name."""
    fam = family_of(model)
    points: dict[str, SwitchableLayerNorm] = {}
    for i, block in enumerate(blocks(model)):
        norms = get_module(block, fam.attn_norm)
        if not isinstance(norms, AttnInputNorms):
            raise SurgeryError(f"model was not prepared for norm removal ({fam.blocks}.{i}.{fam.attn_norm} is not split)")
        points[f"h.{i}.ln_2"] = get_module(block, fam.mlp_norm)
        points[f"h.{i}.ln_1_qk"], points[f"h.{i}.ln_1_v"] = norms.ln_qk, norms.ln_v
    points["ln_f"] = get_module(model, fam.final_norm)
    return points


def token_context(points: dict[str, SwitchableLayerNorm]) -> TokenContext:
    return next(iter(points.values())).context
