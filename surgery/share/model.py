"""The shared-depth twin of every supported family, registered with transformers' Auto classes.

For a source model type T there is a config class `Shared<T's config class>` (model type `shared_T`: the source's
config plus `share_blocks`, `share_norms`, `relax_rank`, `moe_experts`, `moe_top_k`) and a model class
`Shared<T's causal-LM class>` that *is* the source's vanilla causal LM, built by transformers' own class, with every
attention and MLP projection wrapped in a `SharedProjection` (`apply_structure`). Layer l reads block
`share_blocks[l]`, whose weights the first layer of its group owns and stores; a saved model therefore holds each
shared weight once, under its owner's name, and loads with `AutoModelForCausalLM.from_pretrained` after
`import surgery`. Module names are the source's, so `surgery.families` describes the twin as `shared_<family>`.
"""

from __future__ import annotations

import copy
import sys

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.families import FAMILIES, SHARED_PREFIX, family_of, get_module, set_module
from surgery.share.groups import members
from surgery.share.moe import MoEMLP
from surgery.share.tied import SharedModule, SharedProjection

HOW_TO_LOAD = ("`pip install lm-surgery`, then `import surgery` before AutoModelForCausalLM.from_pretrained: importing "
               "it registers the shared_* model types with transformers")
SHARE_FIELDS = ("share_blocks", "share_norms", "relax_rank", "moe_experts", "moe_top_k", "how_to_load")


def relax_rank_of(config) -> int:
    """The relaxation rank as a number: "full" is any rank at least every projection's smaller side."""
    rank = config.relax_rank
    return 1 << 30 if rank == "full" else int(rank or 0)


def projection_paths(family, moe: bool) -> tuple[str, ...]:
    """The block-relative paths of the projections layers share (the MLP's only without a mixture of experts,
    which is shared as a whole)."""
    return (*family.qkv, family.attn_out) + (() if moe else (*family.mlp_in, family.mlp_out))


def apply_structure(model: nn.Module, config) -> None:
    """Wrap `model`'s projections (and norms, MLPs) in place so that the layers of each group read one block."""
    fam = family_of(model)
    layers = get_module(model, fam.blocks)
    if len(config.share_blocks) != len(layers):
        raise SurgeryError(f"share_blocks has {len(config.share_blocks)} entries for {len(layers)} layers")
    rank, moe = relax_rank_of(config), config.moe_experts > 0
    for group in members(config.share_blocks):
        owner = layers[group[0]]
        for path in projection_paths(fam, moe):
            base = get_module(owner, path)
            for l in group:
                set_module(layers[l], path, SharedProjection(base, owner=l == group[0], rank=rank))
        if moe:
            experts = [copy.deepcopy(get_module(owner, fam.mlp)) for _ in range(config.moe_experts)]
            set_module(owner, fam.mlp, MoEMLP(experts, config.hidden_size, config.moe_top_k))
        shared_paths = ((fam.attn_norm, fam.mlp_norm) if config.share_norms == "shared" else ()) + ((fam.mlp,) if moe else ())
        for path in shared_paths:
            for l in group[1:]:
                set_module(layers[l], path, SharedModule(get_module(owner, path)))


class SharedDepthMixin:
    """What a shared-depth twin adds to the source family's causal LM (first in the bases)."""

    def __init__(self, config):
        super().__init__(config)
        apply_structure(self, config)

    def pop_aux_losses(self) -> list:
        """The mixture-of-experts load-balancing losses of the training forwards since the last call."""
        return [loss for m in self.modules() if isinstance(m, MoEMLP) for loss in m.pop_aux_losses()]


SHARED_CONFIGS: dict[str, type] = {}  # shared model type -> config class
SHARED_MODELS: dict[str, type] = {}  # shared model type -> model class


def _make_shared(source_type: str) -> None:
    src_config = CONFIG_MAPPING[source_type]
    src_model = MODEL_FOR_CAUSAL_LM_MAPPING[src_config]
    ns = {"__module__": __name__, "model_type": SHARED_PREFIX + source_type, "share_blocks": None,
          "share_norms": "individual", "relax_rank": 0, "moe_experts": 0, "moe_top_k": 1, "how_to_load": HOW_TO_LOAD,
          "__annotations__": {"share_blocks": list[int] | None, "share_norms": str, "relax_rank": int | str,
                              "moe_experts": int, "moe_top_k": int, "how_to_load": str},
          "__doc__": f"{src_config.__name__} plus the shared-depth layout (see surgery.share.model)."}
    config_cls = strict(type("Shared" + src_config.__name__, (src_config,), ns))
    model_cls = type("Shared" + src_model.__name__, (SharedDepthMixin, src_model),
                     {"__module__": __name__, "config_class": config_cls,
                      "__doc__": f"{src_model.__name__} whose layers share blocks (see surgery.share.model)."})
    for cls in (config_cls, model_cls):
        cls.__qualname__ = cls.__name__
        setattr(sys.modules[__name__], cls.__name__, cls)
    SHARED_CONFIGS[config_cls.model_type], SHARED_MODELS[config_cls.model_type] = config_cls, model_cls
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


for _type in [t for f in FAMILIES.values() if f.is_source and not f.twin_refusal for t in f.model_types]:
    _make_shared(_type)


def shared_config_from(source_config, share_blocks: list[int], share_norms: str = "individual",
                       relax_rank: int | str = 0, moe_experts: int = 0, moe_top_k: int = 1):
    """The shared-depth twin of a source config: the source's fields plus the layout."""
    source_type = getattr(source_config, "model_type", None)
    if SHARED_PREFIX + str(source_type) not in SHARED_CONFIGS:
        fam = family_of(source_config)  # names what is supported, or why not
        if fam.twin_refusal:
            raise SurgeryError(f"model type {source_type!r} has no shared-depth twin: {fam.twin_refusal}")
        raise SurgeryError(f"model type {source_type!r} has no shared-depth twin (is it already one, or a hybrid?)")
    drop = {"model_type", "architectures", "transformers_version", "auto_map"}
    fields = {k: v for k, v in source_config.to_dict().items() if k not in drop}
    fields.update(share_blocks=list(share_blocks), share_norms=share_norms, relax_rank=relax_rank,
                  moe_experts=moe_experts, moe_top_k=moe_top_k)
    return SHARED_CONFIGS[SHARED_PREFIX + source_type](**fields)


def source_config_of(config):
    """The vanilla source config of a shared-depth config (for the expanded export)."""
    if not str(config.model_type).startswith(SHARED_PREFIX):
        raise SurgeryError(f"{config.model_type!r} is not a shared-depth model type")
    drop = {"model_type", "architectures", "transformers_version", "auto_map", *SHARE_FIELDS}
    fields = {k: v for k, v in config.to_dict().items() if k not in drop}
    return AutoConfig.for_model(config.model_type[len(SHARED_PREFIX):], **fields)
