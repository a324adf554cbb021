"""What a surgery needs to know about a model family, described once.

A `Family` says where a model keeps its blocks, norms, attention and MLP projections, embeddings and head;
how the attention input projection(s) are laid out; which kind of norm it uses; whether attention and MLP
read the same residual stream (parallel residual); and which config field holds the norms' epsilon. Every
surgery (LN removal, its export, the TransformerLens conversion, XATL transfer, LN-tuning) reads module
locations and layouts from here, so adding a family is one more `Family` entry, not an edit to each surgery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from surgery.errors import SurgeryError

QKVLayout = Literal["fused", "fused_per_head", "separate"]
# fused:          one projection, output [q | k | v] (GPT-2's Conv1D c_attn)
# fused_per_head: one projection, output per head [q, k, v] x heads (GPT-NeoX's query_key_value)
# separate:       q, k and v projections, k and v with n_kv_heads (grouped-query attention; Llama)


@dataclass(frozen=True)
class Family:
    """Dotted attribute paths are relative to the model, or to a block where noted."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # the ModuleList of transformer blocks
    attn_norm: str  # block: the norm before attention
    mlp_norm: str  # block: the norm before the MLP
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
    norm_kind: Literal["layernorm", "rmsnorm"]  # layernorm centers and has a bias; rmsnorm neither
    eps_key: str  # the config field holding every norm's epsilon
    parallel_residual_key: str | None = None  # config field; None: attention and MLP always in sequence

    def parallel_residual(self, config) -> bool:
        """Whether the MLP reads the block's input (as attention does) instead of the stream after attention."""
        return bool(self.parallel_residual_key and getattr(config, self.parallel_residual_key, False))

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
    parallel_residual_key="use_parallel_residual",
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
)

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, GPT_NEOX, LLAMA)}

# Model types that look like a supported family but are not, with what stands in the way.
UNSUPPORTED = {
    "qwen3": "Qwen3 also normalizes each head's queries and keys (q_norm, k_norm RMSNorms inside attention), "
    "which the llama family does not describe",
}


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face model (or config), from its `model_type`."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types if not t.startswith("hybrid_"))
    why = f": {UNSUPPORTED[model_type]}" if model_type in UNSUPPORTED else ""
    raise SurgeryError(
        f"model type {model_type!r} is not supported{why} (supported: {', '.join(known)} and their XATL hybrids); "
        "add a Family entry in surgery/families.py to support another family"
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


def in_out_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as (in, out), so that y = x @ W + b: a view of an nn.Linear's (out, in)
    weight (writes go through), a GPT-2 Conv1D's own weight."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    if type(module).__name__ == "Conv1D":
        return module.weight
    raise SurgeryError(f"cannot read a projection from a {type(module).__name__} (expected nn.Linear or Conv1D)")
