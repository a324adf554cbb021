"""Turn a model's norms into switchable ones, and name the points a removal schedule acts on.

Point names are the same for every family, one kind per role a norm plays (`surgery.families.Family.block_norms`):
`h.{i}.ln_1_qk` and `h.{i}.ln_1_v` (the attention pre-norm's query/key and value paths, each its own copy),
`h.{i}.ln_2` (the MLP pre-norm), `h.{i}.ln_q` / `h.{i}.ln_k` (QK-norms: a `SwitchableHeadNorm` with one sigma per
head where the family's QK-norm is per head, else one sigma for the whole projection), `h.{i}.ln_attn_out` /
`h.{i}.ln_mlp_out` (post-sublayer norms), `ln_f` (the final norm). A family has the kinds of the norms it holds:
GPT-2, GPT-NeoX and Llama the four of the papers; Qwen3 adds ln_q, ln_k; Gemma 3 all eight; OLMo 2 ln_q, ln_k,
ln_attn_out, ln_mlp_out, ln_f. After `prepare_for_removal`, a block's attention pre-norm is an `AttnInputNorms`
holding both copies, and its attention input projection(s) read the residual stream through them
(`surgery.remove_ln.split_input`).
"""

from __future__ import annotations

from torch import nn

from surgery.errors import SurgeryError
from surgery.families import Family, blocks, family_of, get_module, norm_kind, set_module
from surgery.remove_ln.fake_ln import SwitchableLayerNorm, TokenContext
from surgery.remove_ln.head_norm import SwitchableHeadNorm
from surgery.remove_ln.split_input import AttnInputNorms, NormedInput, SplitQKVInput

# The default removal order. The papers' four kinds keep their order (MLP pre-norm, attention Q/K path, V path,
# final norm). The norms GPT-2-style blocks lack go first, while the pre-norms upstream of them still normalize
# their inputs, so each one's input scale is nearly fixed when it goes: QK-norms, then post-sublayer norms.
KINDS = ("ln_q", "ln_k", "ln_attn_out", "ln_mlp_out", "ln_2", "ln_1_qk", "ln_1_v", "ln_f")
BASE_KINDS = ("ln_2", "ln_1_qk", "ln_1_v", "ln_f")  # the kinds of a GPT-2, GPT-NeoX or Llama-style model
ROLE_KINDS = {"attn_in": ("ln_1_qk", "ln_1_v"), "q": ("ln_q",), "k": ("ln_k",), "attn_out": ("ln_attn_out",),
              "mlp_in": ("ln_2",), "mlp_out": ("ln_mlp_out",)}
KIND_ROLE = {kind: role for role, kinds in ROLE_KINDS.items() for kind in kinds}


def family_kinds(fam: Family) -> tuple[str, ...]:
    """The point kinds a model of family `fam` has, in `KINDS` order."""
    present = {k for role in fam.block_norms() for k in ROLE_KINDS[role]} | {"ln_f"}
    return tuple(k for k in KINDS if k in present)


def point_kinds(points) -> tuple[str, ...]:
    """The kinds of the points named in `points` (names or a dict by name), in `KINDS` order."""
    present = {name.rsplit(".", 1)[-1] for name in points}
    return tuple(k for k in KINDS if k in present)


def point_names(n_blocks: int, kinds=BASE_KINDS) -> dict[str, list[str]]:
    """Point names by kind (of `kinds`), block by block."""
    return {k: ["ln_f"] if k == "ln_f" else [f"h.{i}.{k}" for i in range(n_blocks)] for k in kinds}


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


def _switchable(norm: nn.Module, role: str, fam: Family, config, context: TokenContext, momentum: float):
    """The switchable twin of the norm playing `role` in a block: per-head sigmas for a per-head QK-norm."""
    if role in ("q", "k") and fam.qk_norm == "per_head":
        heads = config.num_attention_heads if role == "q" else getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return SwitchableHeadNorm(norm, heads, fam.qk_head_axis, context, momentum, fam.norm_gain_offset)
    return SwitchableLayerNorm(norm, context, momentum, fam.norm_gain_offset)


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
        for role, path in fam.block_norms().items():
            norm = _as_norm(get_module(block, path), f"{where}.{path}", fam)
            if role == "attn_in":
                points[f"h.{i}.ln_1_qk"], points[f"h.{i}.ln_1_v"] = _split_attn_input(model, block, norm, where, context, momentum)
                continue
            points[f"h.{i}.{ROLE_KINDS[role][0]}"] = switchable = _switchable(norm, role, fam, model.config, context, momentum)
            set_module(block, path, switchable.train(norm.training))
    final = _as_norm(get_module(model, fam.final_norm), fam.final_norm, fam)
    points["ln_f"] = SwitchableLayerNorm(final, context, momentum, fam.norm_gain_offset).train(final.training)
    set_module(model, fam.final_norm, points["ln_f"])
    return points


def _split_attn_input(model, block, attn_norm, where, context, momentum):
    """Put an `AttnInputNorms` (two copies of the attention pre-norm) at the norm's place and wrap the attention
    input projection(s) to read the raw stream through it; returns the (query/key, value) copies."""
    fam = family_of(model)
    copies = [SwitchableLayerNorm(attn_norm, context, momentum, fam.norm_gain_offset) for _ in range(2)]
    norms = AttnInputNorms(*copies)
    norms.train(attn_norm.training)  # new modules start in training mode; keep the model's mode
    set_module(block, fam.attn_norm, norms)
    if fam.qkv_layout == "separate":
        for path, which in zip(fam.qkv, ("qk", "qk", "v")):
            proj = _projection(block, path, where)
            set_module(block, path, NormedInput(proj, norms, which).train(proj.training))
    else:
        proj = _projection(block, fam.qkv[0], where)
        set_module(block, fam.qkv[0], SplitQKVInput(proj, norms, fam.value_outputs(model.config)).train(proj.training))
    return norms.ln_qk, norms.ln_v


def find_points(model: nn.Module) -> dict[str, SwitchableLayerNorm]:
    """The switchable norms of a model already prepared by `prepare_for_removal`, by point name."""
    fam = family_of(model)
    points: dict[str, SwitchableLayerNorm] = {}
    for i, block in enumerate(blocks(model)):
        for role, path in fam.block_norms().items():
            module = get_module(block, path)
            if not isinstance(module, (AttnInputNorms, SwitchableLayerNorm)):
                raise SurgeryError(f"model was not prepared for norm removal ({fam.blocks}.{i}.{path} is a "
                                   f"{type(module).__name__}); call prepare_for_removal first")
            if role == "attn_in":
                points[f"h.{i}.ln_1_qk"], points[f"h.{i}.ln_1_v"] = module.ln_qk, module.ln_v
            else:
                points[f"h.{i}.{ROLE_KINDS[role][0]}"] = module
    points["ln_f"] = get_module(model, fam.final_norm)
    return points


def token_context(points: dict[str, SwitchableLayerNorm]) -> TokenContext:
    return next(iter(points.values())).context
