"""What a surgery needs to know about a model family, described once.

A `Family` says where a model keeps its blocks, norms, attention and MLP projections, embeddings and head;
how the attention input projection(s) are laid out; which kind of norm it uses; whether attention and MLP
read the same residual stream (parallel residual); which config fields hold the norms' epsilon, the context
length, the MLP width, the activation and the rotary settings; its transformers class; and the name under which
its decoder layer hands the cache to attention; and every norm a block holds, by role (`Family.block_norms`: the
pre-norms before attention and MLP, post-sublayer norms on their outputs, QK-norms on the query and key
projections, per head or over the whole projection), with the `(offset + weight)` gain and the embedding scale of
families that have them. Every surgery (LN removal, its export, the TransformerLens
conversion, XATL transfer, LN-tuning) reads these facts from here, so adding a family is one more `Family`
entry, not an edit to each surgery.

Norm modules are recognised here too (`is_norm`, `norm_kind`, `norm_eps`): torch's nn.LayerNorm and nn.RMSNorm,
transformers' *LayerNorm and *RMSNorm classes (by class name: they share no base class), and modules that declare
their kind with a `norm_kind` attribute ("layernorm" or "rmsnorm"; `surgery.remove_ln`'s SwitchableLayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from torch import nn

from surgery.errors import SurgeryError

QKVLayout = Literal["fused", "fused_per_head", "separate"]
# fused:          one projection, output [q | k | v] (GPT-2's Conv1D c_attn)
# fused_per_head: one projection, output per head [q, k, v] x heads (GPT-NeoX's query_key_value)
# separate:       q, k and v projections, k and v with n_kv_heads (grouped-query attention; Llama)
NormKind = Literal["layernorm", "rmsnorm"]  # layernorm centers and has a bias; rmsnorm neither
QKNorm = Literal["per_head", "whole"]
# per_head: an RMSNorm over each head's query / key features (width d_head), one gain shared by the heads (Qwen3, Gemma 3)
# whole:    an RMSNorm over the whole query / key projection output (width heads * d_head; OLMo 2)
NormRole = Literal["attn_in", "q", "k", "attn_out", "mlp_in", "mlp_out"]
# attn_in / mlp_in: pre-norms, read by the attention input / MLP input projections
# q / k:            QK-norms on the query / key projection outputs (before RoPE)
# attn_out / mlp_out: post-sublayer norms on attention's / the MLP's output, before the residual add


class Rotary(NamedTuple):
    """A rotary family's position settings: `kind` (transformers' rope_type, "default" for plain RoPE), the
    `fraction` of each head's features rotated, and the `base` of the rotation frequencies."""

    kind: str
    fraction: float
    base: float


@dataclass(frozen=True)
class Family:
    """Dotted attribute paths are relative to the model, or to a block where noted."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # the ModuleList of transformer blocks
    attn_norm: str | None  # block: the norm before attention (None: no pre-norm, OLMo 2)
    mlp_norm: str | None  # block: the norm before the MLP
    final_norm: str
    attn: str  # block
    mlp: str  # block
    qkv: tuple[str, ...]  # block: the attention input projection(s): one fused, or q, k, v
    qkv_layout: QKVLayout
    attn_out: str  # block: the attention output projection
    mlp_in: tuple[str, ...]  # block: every projection reading the MLP norm (gate and up for SwiGLU)
    mlp_out: str  # block
    tok_emb: str
    pos_emb: str | None  # learned positions; None for rotary families
    lm_head: str
    norm_kind: NormKind
    eps_key: str  # the config field holding every norm's epsilon
    hf_architecture: str  # the transformers causal-LM class (TransformerLens' `original_architecture`)
    context_key: str  # the config field holding the number of positions
    mlp_width_key: str  # the config field holding the MLP's hidden width (None there: 4 * hidden_size)
    activation_key: str  # the config field naming the MLP activation (transformers' name, e.g. "gelu_new")
    parallel_residual_key: str | None = None  # config field; None: attention and MLP always in sequence
    hybrid: bool = False  # an XATL hybrid of the family: mixers in place of attention in some layers
    shared: bool = False  # a shared-depth twin of the family: layers reading one block's weights (surgery.share)
    # Rotary families: the config fields transformers 4.x kept the rotated fraction and the base in (5.x keeps
    # both in `config.rope_parameters`, read first); None for a family with learned positions.
    rotary_fraction_key: str | None = None
    rotary_base_key: str | None = None
    sliding_window_key: str | None = None  # config field of a sliding attention window, where the family has one
    # Config flags that change attention's 1/sqrt(d_head) scaling, each with the value that keeps it.
    attn_scale_flags: tuple[tuple[str, bool], ...] = ()
    # The argument under which a decoder layer hands the cache to its attention module; None: the name transformers
    # uses for the model's own cache argument (`cache` from 5.24, `past_key_values` before).
    layer_cache_arg: str | None = None
    # Norms beyond the pre-norms. Post-sublayer norms (block paths) on attention's and the MLP's output before the
    # residual add: a fixed scale folds into attn_out / mlp_out. QK-norms (`qk_norm_paths`, block paths) on the query
    # and key projections: a fixed scale folds into the rows of qkv[0] / qkv[1] (per head for "per_head").
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    qk_norm: QKNorm | None = None
    qk_norm_paths: tuple[str, str] = ("self_attn.q_norm", "self_attn.k_norm")
    qk_head_axis: int = -2  # per-head QK-norm: the head axis of its input, (B, T, H, d_head): -2; (B, H, T, d_head): -3
    norm_gain_offset: float = 0.0  # RMSNorm gain is (offset + weight): Gemma's is (1 + weight), its weight starts at 0
    embed_scale_sqrt_width: bool = False  # token embeddings are multiplied by sqrt(hidden_size) (Gemma)
    query_scale_key: str | None = None  # config field q: attention scores scaled by q**-0.5 instead of d_head**-0.5
    softcap_keys: tuple[str, ...] = ()  # config fields that, when set, put a tanh soft cap on scores or logits
    # Why XATL hybrids and shared-depth twins do not take this family; None where they do.
    twin_refusal: str | None = None

    def block_norms(self) -> dict[NormRole, str]:
        """Every norm a block holds, by role, in forward order: {role: block-relative path}."""
        q, k = self.qk_norm_paths if self.qk_norm else (None, None)
        roles = {"attn_in": self.attn_norm, "q": q, "k": k, "attn_out": self.attn_out_norm, "mlp_in": self.mlp_norm,
                 "mlp_out": self.mlp_out_norm}
        return {role: path for role, path in roles.items() if path is not None}

    def embed_scale(self, config) -> float:
        """The factor the token embeddings are multiplied by before the first block (sqrt(d) for Gemma, else 1)."""
        return float(config.hidden_size) ** 0.5 if self.embed_scale_sqrt_width else 1.0

    def softcaps(self, config) -> dict[str, float]:
        """The soft caps a model of this family sets ({config field: cap}); empty for plain scores and logits."""
        return {key: getattr(config, key) for key in self.softcap_keys if getattr(config, key, None) is not None}

    @property
    def is_source(self) -> bool:
        """A family transformers itself defines (not a hybrid or shared-depth twin made from one)."""
        return not (self.hybrid or self.shared)

    def parallel_residual(self, config) -> bool:
        """Whether the MLP reads the block's input (as attention does) instead of the stream after attention."""
        return bool(self.parallel_residual_key and getattr(config, self.parallel_residual_key, False))

    def context_length(self, config) -> int:
        """Positions a model of this family can attend over (GPT-2's n_positions, else max_position_embeddings)."""
        return getattr(config, self.context_key)

    def attention_span(self, config) -> int:
        """Positions one query attends over: the context length, capped by a sliding window where the config uses one
        (within the window, sliding-window attention is plain causal attention)."""
        n_ctx = self.context_length(config)
        window = getattr(config, self.sliding_window_key, None) if self.sliding_window_key else None
        if window and getattr(config, "use_sliding_window", True):  # Qwen2 switches its window on and off
            n_ctx = min(n_ctx, window)
        return n_ctx

    def mlp_width(self, config) -> int:
        """The MLP's hidden width (GPT-2's `n_inner` may be None: then 4 * hidden_size)."""
        return getattr(config, self.mlp_width_key, None) or 4 * config.hidden_size

    def activation(self, config) -> str | None:
        """transformers' name of the MLP activation ("gelu_new", "gelu", "silu", ...)."""
        return getattr(config, self.activation_key, None)

    def rotary(self, config) -> Rotary | None:
        """The rotary settings of a model of this family (transformers 5.x `rope_parameters`, 4.x `rope_scaling`
        and the family's own fields); None for a family with learned positions."""
        if self.pos_emb:
            return None
        def field(key: str | None, default: float) -> float:
            return getattr(config, key, default) if key else default

        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        params = dict(params.get("full_attention", params))  # Gemma 3: per layer type; the full-attention layers' here
        kind = params.get("rope_type", params.get("type", "default"))
        base = params.get("rope_theta", field(self.rotary_base_key, 10000.0))
        fraction = params.get("partial_rotary_factor", field(self.rotary_fraction_key, 1.0))
        return Rotary(kind, float(fraction), float(base))

    def standard_attn_scale(self, config) -> bool:
        """Whether attention scores are scaled by 1/sqrt(d_head) and nothing else (GPT-2 has flags for others)."""
        return all(bool(getattr(config, key, keep)) == keep for key, keep in self.attn_scale_flags)

    def value_outputs(self, config) -> torch.Tensor:
        """For a fused Q/K/V projection: a bool mask over its outputs, True where an output is a value feature."""
        d, heads = config.hidden_size, config.num_attention_heads
        if self.qkv_layout == "fused":
            return torch.arange(3 * d) >= 2 * d
        if self.qkv_layout == "fused_per_head":
            return (torch.arange(3 * d) // (d // heads)) % 3 == 2
        raise SurgeryError(f"family {self.name} has separate q/k/v projections, not a fused one")


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    final_norm="transformer.ln_f",
    attn="attn",
    mlp="mlp",
    qkv=("attn.c_attn",),
    qkv_layout="fused",
    attn_out="attn.c_proj",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    tok_emb="transformer.wte",
    pos_emb="transformer.wpe",
    lm_head="lm_head",
    norm_kind="layernorm",
    eps_key="layer_norm_epsilon",
    hf_architecture="GPT2LMHeadModel",
    context_key="n_positions",
    mlp_width_key="n_inner",
    activation_key="activation_function",
    attn_scale_flags=(("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)),
)

GPT_NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    final_norm="gpt_neox.final_layer_norm",
    attn="attention",
    mlp="mlp",
    qkv=("attention.query_key_value",),
    qkv_layout="fused_per_head",
    attn_out="attention.dense",
    mlp_in=("mlp.dense_h_to_4h",),
    mlp_out="mlp.dense_4h_to_h",
    tok_emb="gpt_neox.embed_in",
    pos_emb=None,
    lm_head="lm_head",  # `embed_out` in checkpoints; transformers >= 5.17 loads it as lm_head
    norm_kind="layernorm",
    eps_key="layer_norm_eps",
    hf_architecture="GPTNeoXForCausalLM",
    context_key="max_position_embeddings",
    mlp_width_key="intermediate_size",
    activation_key="hidden_act",
    parallel_residual_key="use_parallel_residual",
    rotary_fraction_key="rotary_pct",
    rotary_base_key="rotary_emb_base",
    layer_cache_arg="layer_past",
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "qwen2", "mistral"),
    blocks="model.layers",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    final_norm="model.norm",
    attn="self_attn",
    mlp="mlp",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    qkv_layout="separate",
    attn_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    tok_emb="model.embed_tokens",
    pos_emb=None,
    lm_head="lm_head",
    norm_kind="rmsnorm",
    eps_key="rms_norm_eps",
    hf_architecture="LlamaForCausalLM",  # also for qwen2 and mistral: the same computation
    context_key="max_position_embeddings",
    mlp_width_key="intermediate_size",
    activation_key="hidden_act",
    rotary_fraction_key="partial_rotary_factor",
    rotary_base_key="rope_theta",
    sliding_window_key="sliding_window",  # mistral, qwen2
)

_QK_TWIN = ("its attention normalizes queries and keys (q_norm, k_norm){}: hybrid and shared-depth twins are "
            "built for the gpt2, gpt_neox and llama blocks and have no place for those norms (not built)")

QWEN3 = replace(LLAMA, name="qwen3", model_types=("qwen3",), hf_architecture="Qwen3ForCausalLM", qk_norm="per_head",
                twin_refusal=_QK_TWIN.format(""))

GEMMA3 = replace(
    LLAMA, name="gemma3", model_types=("gemma3_text",), hf_architecture="Gemma3ForCausalLM",
    mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm", qk_norm="per_head", qk_head_axis=-3, norm_gain_offset=1.0,
    embed_scale_sqrt_width=True, query_scale_key="query_pre_attn_scalar", activation_key="hidden_activation",
    softcap_keys=("attn_logit_softcapping", "final_logit_softcapping"),
    twin_refusal=_QK_TWIN.format(" and every sublayer's output"))

OLMO2 = replace(
    LLAMA, name="olmo2", model_types=("olmo2",), hf_architecture="Olmo2ForCausalLM", attn_norm=None, mlp_norm=None,
    attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm", qk_norm="whole",
    sliding_window_key=None, twin_refusal=_QK_TWIN.format(" and it normalizes sublayer outputs, not inputs"))

HYBRID_PREFIX = "hybrid_"


def hybrid_of(family: Family) -> Family:
    """The XATL hybrid of a family (`surgery.xatl.hybrid`): the same module layout under `hybrid_<model type>`, so
    every surgery finds a hybrid's norms, MLPs and kept attention layers where the source family keeps them."""
    return replace(family, name=HYBRID_PREFIX + family.name, hybrid=True,
                   model_types=tuple(HYBRID_PREFIX + t for t in family.model_types))


SHARED_PREFIX = "shared_"


def shared_of(family: Family) -> Family:
    """The shared-depth twin of a family (`surgery.share`): the same module layout under `shared_<model type>`, with
    each block's projections wrapped so that several layers read one weight (norms stay where the family keeps them)."""
    return replace(family, name=SHARED_PREFIX + family.name, shared=True,
                   model_types=tuple(SHARED_PREFIX + t for t in family.model_types))


FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, GPT_NEOX, LLAMA)}
_SOURCES = list(FAMILIES.values())
FAMILIES.update({hybrid_of(f).name: hybrid_of(f) for f in _SOURCES})
FAMILIES.update({shared_of(f).name: shared_of(f) for f in _SOURCES})
FAMILIES.update({f.name: f for f in (QWEN3, GEMMA3, OLMO2)})  # no hybrid or shared twins: `Family.twin_refusal`


def _described_family(config) -> Family | None:
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face model (or config), from its `model_type`."""
    config = getattr(model, "config", model)
    family = _described_family(config)
    if family is not None:
        return family
    model_type = getattr(config, "model_type", None)
    known = sorted(t for f in FAMILIES.values() for t in f.model_types if f.is_source)
    twinned = [f.name for f in FAMILIES.values() if f.is_source and not f.twin_refusal]
    raise SurgeryError(
        f"model type {model_type!r} is not supported (supported: {', '.join(known)}, and the XATL hybrids and "
        f"shared-depth twins of {', '.join(twinned)}); "
        "add a Family entry in surgery/families.py to support another family"
    )


def context_length_of(model_or_config) -> int | None:
    """Positions a model attends over: its family's `Family.context_length`; for a model of no described family
    (BERT, say), the first of the families' context fields its config has; None when it has none."""
    config = getattr(model_or_config, "config", model_or_config)
    family = _described_family(config)
    keys = (family.context_key,) if family else tuple(dict.fromkeys(f.context_key for f in FAMILIES.values()))
    return next((value for key in keys if (value := getattr(config, key, None))), None)


NORM_CLASS_SUFFIXES: dict[str, NormKind] = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}  # transformers' classes
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")  # torch's norms and ours; transformers' RMSNorms; others


def norm_kind(module: nn.Module) -> NormKind | None:
    """The kind of a norm module, "layernorm" or "rmsnorm"; None for any other module. A module that declares its
    kind (a `norm_kind` attribute, as SwitchableLayerNorm does) has that kind; otherwise torch's classes (GPT-2's,
    GPT-NeoX's and BERT's LayerNorms are nn.LayerNorm) and transformers' *LayerNorm / *RMSNorm classes by name."""
    declared = getattr(module, "norm_kind", None)
    if isinstance(declared, str) and declared in ("layernorm", "rmsnorm"):
        return declared
    if isinstance(module, nn.RMSNorm):
        return "rmsnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    name = type(module).__name__
    return next((kind for suffix, kind in NORM_CLASS_SUFFIXES.items() if name.endswith(suffix)), None)


def is_norm(module: nn.Module) -> bool:
    """Whether `module` is a norm (LayerNorm or RMSNorm, torch's, transformers' or ours; see `norm_kind`)."""
    return norm_kind(module) is not None


def norm_eps(module: nn.Module) -> float | None:
    """A norm module's epsilon (`eps` of torch's norms and ours, `variance_epsilon` of transformers' RMSNorms); None
    where it has none (nn.RMSNorm's default eps=None: the machine epsilon of its input's dtype)."""
    for name in EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def set_norm_eps(module: nn.Module, eps: float) -> None:
    """Set a norm module's epsilon in whichever attribute of `EPS_ATTRIBUTES` it keeps it."""
    name = next((n for n in EPS_ATTRIBUTES if isinstance(getattr(module, n, None), (int, float))), None)
    if name is None:
        raise SurgeryError(f"cannot set the epsilon of a {type(module).__name__}: "
                           f"it has none of {', '.join(EPS_ATTRIBUTES)}")
    setattr(module, name, eps)


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def blocks(model: nn.Module) -> nn.ModuleList:
    return get_module(model, family_of(model).blocks)


def norm_paths(model: nn.Module) -> list[str]:
    """Dotted paths of every norm, in forward order: block by block (`Family.block_norms`), then the final norm."""
    fam = family_of(model)
    paths = [f"{fam.blocks}.{i}.{n}" for i in range(len(blocks(model))) for n in fam.block_norms().values()]
    return paths + [fam.final_norm]


def in_out_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as (in, out), so that y = x @ W + b: a view of an nn.Linear's (out, in)
    weight (writes go through), a GPT-2 Conv1D's own weight."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    if type(module).__name__ == "Conv1D":
        return module.weight
    raise SurgeryError(f"cannot read a projection from a {type(module).__name__} (expected nn.Linear or Conv1D)")


# ----------------------------------------------------------------------------------- encoders and block parts
@dataclass(frozen=True)
class EncoderLayout:
    """What parameter-efficient tuning reads in a post-norm encoder (BERT and its distillations, e.g. MiniLM).
    `blocks` is the tail of the dotted name of the ModuleList of layers (found at any depth, so BertModel and
    every Bert*For* head class share the entry); the other paths are relative to one layer."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    attn_norm: str  # the norm inside attention: LayerNorm(attention output + residual), post-norm
    qkv: tuple[str, ...]  # q, k, v
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str


BERT = EncoderLayout(name="bert", model_types=("bert",), blocks="encoder.layer", attn_norm="attention.output.LayerNorm",
                     qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
                     attn_out="attention.output.dense", mlp_in=("intermediate.dense",), mlp_out="output.dense")
ENCODERS: dict[str, EncoderLayout] = {BERT.name: BERT}
BlockPart = Literal["attn_norm", "mlp_norm", "qkv", "attn_out", "mlp_in", "mlp_out"]


def layout_of(model: nn.Module) -> tuple[Family | EncoderLayout, str]:
    """(the family or encoder layout of a Hugging Face model, the dotted path of its layer list)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    encoder = next((e for e in ENCODERS.values() if model_type in e.model_types), None)
    if encoder is None:
        return family_of(model), family_of(model).blocks
    found = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and (n == encoder.blocks or n.endswith("." + encoder.blocks))]
    if len(found) != 1:
        raise SurgeryError(f"expected one {encoder.blocks!r} layer list in this {model_type} model, found {found}")
    return encoder, found[0]


def block_part_paths(model: nn.Module, part: BlockPart) -> list[str]:
    """Full dotted module paths of one part of every block, block by block (several per block for `qkv`, `mlp_in`).

    attn_norm: the norm that feeds attention in a pre-norm decoder (GPT-2 `ln_1`, GPT-NeoX and Llama
    `input_layernorm`), the norm inside attention in a post-norm encoder (BERT `attention.output.LayerNorm`).
    mlp_norm: a decoder's norm before the MLP (an encoder has none in the table: refused by name)."""
    layout, list_path = layout_of(model)
    rel = getattr(layout, part, None)
    if rel is None and isinstance(layout, Family) and part in ("attn_norm", "mlp_norm"):
        raise SurgeryError(f"{layout.name} blocks have no {part} (no pre-norm; their norms: "
                           f"{', '.join(layout.block_norms().values())}); choose a part they have, e.g. every norm")
    if rel is None:
        raise SurgeryError(f"{layout.name} layouts do not describe {part!r}; describe it in surgery/families.py")
    rels = (rel,) if isinstance(rel, str) else rel
    return [f"{list_path}.{i}.{r}" for i in range(len(model.get_submodule(list_path))) for r in rels]
