"""The surgery: a pretrained model made shared along depth, and the way back to the family's vanilla class.

    from surgery.share import ShareConfig, share_depth, expand
    shared = share_depth(model, ShareConfig(groups="cycle:2", norms="individual", relax_rank=4))
    vanilla = expand(shared)          # the family's own class, weights written out per layer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from surgery.errors import SurgeryError
from surgery.families import family_of, get_module, in_out_weight
from surgery.models.loss import causal_lm_loss
from surgery.share.groups import INITS, Init, block_of_layer, init_layers, members
from surgery.share.model import (SHARED_MODELS, projection_paths, shared_config_from, source_config_of)
from surgery.share.moe import MoEMLP
from surgery.share.tied import SharedModule

NORMS = ("individual", "shared")


@dataclass
class ShareConfig:
    """How a model is shared along depth (YAML: `model.init_args.share`).

    Args:
        groups: which layers read one block: "cycle:K" (layer l reads block l mod K), "contiguous:K" (K runs of
            consecutive layers) or a list with one block id per layer.
        init: each shared block's weights from its layers' "average", the group's "first" layer, or "stepwise"
            (block k from layer round(k L / K); Bae et al. 2024).
        norms: "individual" (each layer keeps its own norms, copied from the original layer; WideNet) or
            "shared" (the norms are shared with the block like the projections, made by `init` as well).
        relax_rank: rank r of each layer's own low-rank delta on every shared projection, initialized from a
            truncated SVD of (original layer weight - shared weight); 0: none; "full": exact at the start.
        moe_experts: E > 0 makes each shared MLP a mixture of E experts, expert e a copy of the e-th layer's MLP of
            its group (cycling when the group has fewer layers), with a new router. 0: a plain shared MLP.
        moe_top_k: experts each token is sent to.
    """

    groups: str | list[int] = "cycle:2"
    init: Init = "average"
    norms: Literal["individual", "shared"] = "individual"
    relax_rank: int | Literal["full"] = 0
    moe_experts: int = 0
    moe_top_k: int = 1

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise SurgeryError(f"share.init={self.init!r}: choose one of {', '.join(INITS)}")
        if self.norms not in NORMS:
            raise SurgeryError(f"share.norms={self.norms!r}: choose individual (each layer its own) or shared")
        if self.relax_rank != "full" and not (isinstance(self.relax_rank, int) and self.relax_rank >= 0):
            raise SurgeryError(f"share.relax_rank={self.relax_rank!r}: a rank >= 0 (0: no relaxation) or 'full'")
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            raise SurgeryError(f"share.moe_experts={self.moe_experts}, moe_top_k={self.moe_top_k}: need experts >= 0 "
                               "and 1 <= top_k <= experts")
        if self.moe_experts and self.relax_rank:
            raise SurgeryError("share.relax_rank with share.moe_experts: the mixture of experts is shared whole, "
                               "relaxation applies to shared projections; set one of them to 0")


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach().double() for t in tensors]).mean(0)


@torch.no_grad()
def share_depth(model: PreTrainedModel, config: ShareConfig | None = None) -> PreTrainedModel:
    """The shared-depth twin of a pretrained causal LM, its weights made from `model`'s (which is not changed)."""
    config = config or ShareConfig()
    fam = family_of(model)
    if not fam.is_source:
        raise SurgeryError(f"share_depth needs a model of a transformers family, not a {fam.name} model")
    src_layers = get_module(model, fam.blocks)
    block_ids = block_of_layer(config.groups, len(src_layers))
    cfg = shared_config_from(model.config, block_ids, config.norms, config.relax_rank, config.moe_experts,
                             config.moe_top_k)
    shared = causal_lm_loss(SHARED_MODELS[cfg.model_type](cfg)).to(model.dtype)
    src_state = model.state_dict()
    for name, tensor in shared.state_dict().items():  # embeddings, every layer's norms, final norm, head, buffers
        if name in src_state and src_state[name].shape == tensor.shape:
            tensor.copy_(src_state[name])
    layers = get_module(shared, fam.blocks)
    groups, sources = members(block_ids), init_layers(block_ids, config.init)
    for group, source in zip(groups, sources):
        owner = layers[group[0]]
        for path in projection_paths(fam, config.moe_experts > 0):
            originals = [get_module(src_layers[l], path) for l in source]
            base = get_module(owner, path).base
            in_out_weight(base).copy_(_mean([in_out_weight(m) for m in originals]))
            if getattr(base, "bias", None) is not None:
                base.bias.copy_(_mean([m.bias for m in originals]))
            for l in group:
                original = get_module(src_layers[l], path)
                get_module(layers[l], path).relax_towards(in_out_weight(original), getattr(original, "bias", None))
        if config.norms == "shared":
            for path in (fam.attn_norm, fam.mlp_norm):
                target = get_module(owner, path)
                for name, p in target.named_parameters():
                    p.copy_(_mean([get_module(src_layers[l], path).get_parameter(name) for l in source]))
        if config.moe_experts:
            moe: MoEMLP = get_module(owner, fam.mlp)
            for e, expert in enumerate(moe.experts):
                expert.load_state_dict(get_module(src_layers[group[e % len(group)]], fam.mlp).state_dict())
    return shared


@torch.no_grad()
def expand(model: PreTrainedModel) -> PreTrainedModel:
    """The family's vanilla class with each layer's weights written out: every projection as the layer computes it
    (shared weight plus its delta), shared norms copied into every layer. Refused for a mixture-of-experts MLP,
    which no vanilla class has."""
    cfg = model.config
    if getattr(cfg, "moe_experts", 0):
        raise SurgeryError("a shared-depth model with a mixture-of-experts MLP has no vanilla form (the family's "
                           "class has one MLP per layer); save it with save_pretrained and load it after import surgery")
    vanilla = causal_lm_loss(AutoModelForCausalLM.from_config(source_config_of(cfg))).to(model.dtype)
    fam = family_of(vanilla)
    own = model.state_dict()
    for name, tensor in vanilla.state_dict().items():
        if name in own and own[name].shape == tensor.shape:
            tensor.copy_(own[name])
    for layer, out in zip(get_module(model, fam.blocks), get_module(vanilla, fam.blocks)):
        for path in projection_paths(fam, moe=False):
            weight, bias = get_module(layer, path).effective()
            target = get_module(out, path)
            in_out_weight(target).copy_(weight)
            if bias is not None:
                target.bias.copy_(bias)
        for path in (fam.attn_norm, fam.mlp_norm):
            norm = get_module(layer, path)
            if isinstance(norm, SharedModule):
                get_module(out, path).load_state_dict(norm.target.state_dict())
    vanilla.eval()
    return vanilla


def unique_parameters(model: nn.Module) -> int:
    """Parameters stored once however many layers read them (`parameters()` lists a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())

