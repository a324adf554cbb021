"""A causal LM of any supported family whose attention is replaced by a linear-cost mixer in some or all layers.

Design (one for every family in `surgery.families`): for a source model type T (gpt2, gpt_neox, llama, qwen2,
mistral) there is a config class `Hybrid<T's config class>` (model type `hybrid_T`: the source's config plus
`mixer`, `mixer_config`, `attn_layers`) and a model class `Hybrid<T's causal-LM class>` that *is* the source's
vanilla causal LM, built by transformers' own class, with the attention module of every mixer layer swapped for
a `MixerAttention`: an adapter with the attention's call signature around a mixer (`attn.mixer`). Both classes
are made from the source's at import (`_make_hybrid`); nothing is written per family. Module names are the
source's, so `surgery.families` describes a hybrid as family `hybrid_<family>` and every tool reads it.

What the swap means per family. Parallel residual (GPT-NeoX): the mixer sits where attention was, reading the
same input norm, and the MLP still reads its own norm of the block input. Positions: mixers take none (they are
causal and order-aware through their recurrence); learned positions (GPT-2) stay in the embeddings; rotary
embeddings (GPT-NeoX, Llama) are computed by the vanilla model as before and used by kept attention layers only,
from position ids that continue across cached steps. Grouped-query attention (Llama): kept layers keep their KV
heads; mixers have one head per query head.

`forward` is the vanilla one, wrapped: the cache is a `surgery.xatl.hybrid.cache.HybridCache` (mixer layers hold a
fixed-size state, kept attention layers a KV cache) handed around under the name the installed transformers
uses (`cache` from 5.24, `past_key_values` before; both are accepted, and GPT-NeoX's `layer_past` reaches the
adapter); with a cache, the causal mask is passed as a 4D additive mask, so transformers never sizes masks from
the cache's layers. Padding masks are refused (mixers have no notion of a masked token); kept attention layers
attend causally over the whole context (a Mistral sliding window is not applied).
"""

from __future__ import annotations

from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.families import FAMILIES, HYBRID_PREFIX, family_of
from surgery.models.loss import causal_lm_loss
from surgery.xatl.hybrid.cache import CACHE_NAMES
from surgery.xatl.hybrid.core import HybridMixin, MixerAttention, make_hybrid_classes
from surgery.xatl.hybrid.portable import write_portable_code
from surgery.xatl.mixers import MIXERS

PREFIX = HYBRID_PREFIX
# Written into every saved hybrid's config.json: transformers itself answers an unknown model type by suggesting an
# upgrade of transformers, which does not help.
HOW_TO_LOAD = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) runs the code saved beside the "
               "weights (torch and transformers only); or `pip install lm-surgery`, then `import surgery` before "
               "from_pretrained: importing it registers the hybrid_* model types with transformers")
# Names under which a decoder layer hands the cache to its attention module: transformers' own, and each family's
# `Family.layer_cache_arg` where it has another (GPT-NeoX's `layer_past`).
LAYER_CACHE_NAMES = tuple(dict.fromkeys((*CACHE_NAMES, *(f.layer_cache_arg for f in FAMILIES.values() if f.layer_cache_arg))))
__all__ = ["HybridMixin", "MixerAttention", "hybrid_config_from", "hybrid_model", "LAYER_CACHE_NAMES"]


class SavesPortableCode:
    """`save_pretrained` also writes the code that builds this hybrid beside the weights, and an `auto_map` in
    config.json, so that `trust_remote_code=True` loads it where `surgery` is not installed."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        fam = family_of(self)
        write_portable_code(save_directory, self.config.model_type[len(PREFIX):], blocks=fam.blocks,
                            attn=fam.attn, cache_names=LAYER_CACHE_NAMES, how_to_load=HOW_TO_LOAD)
        return out


HYBRID_CONFIGS: dict[str, type] = {}  # hybrid model type -> config class
HYBRID_MODELS: dict[str, type] = {}  # hybrid model type -> model class


def _make_hybrid(source_type: str) -> None:
    """Make, register and export the config and model classes of the hybrid of `source_type`."""
    fam = next(f for f in FAMILIES.values() if source_type in f.model_types)
    config_cls, model_cls = make_hybrid_classes(source_type, fam.blocks, fam.attn, LAYER_CACHE_NAMES, HOW_TO_LOAD,
                                                module=__name__, bases=(SavesPortableCode,))
    HYBRID_CONFIGS[config_cls.model_type], HYBRID_MODELS[config_cls.model_type] = config_cls, model_cls
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


for _type in [t for f in FAMILIES.values() if f.is_source and not f.twin_refusal for t in f.model_types]:
    _make_hybrid(_type)

HybridGPT2Config = HYBRID_CONFIGS["hybrid_gpt2"]
HybridGPT2LMHeadModel = HYBRID_MODELS["hybrid_gpt2"]


def hybrid_config_from(source_config, mixer: str, mixer_config: dict | None = None,
                       attn_layers: list[int] | None = None):
    """The hybrid twin of a source config (any supported family): same width, depth, heads, vocabulary,
    positions and norm epsilon (so an LN-free source stays LN-free); extra fields such as `surgery_ln_free`
    are kept."""
    if mixer not in MIXERS:
        raise SurgeryError(f"unknown mixer {mixer!r}; choose one of: {', '.join(sorted(MIXERS))}")
    source_type = getattr(source_config, "model_type", None)
    if source_type not in CONFIG_MAPPING or PREFIX + source_type not in HYBRID_CONFIGS:
        fam = family_of(source_config)  # names what is supported, or why not
        if fam.twin_refusal:
            raise SurgeryError(f"model type {source_type!r} has no hybrid: {fam.twin_refusal}")
        raise SurgeryError(f"model type {source_type!r} has no hybrid (is it already one?)")
    config_cls = HYBRID_CONFIGS[PREFIX + source_type]
    drop = {"model_type", "architectures", "transformers_version", "auto_map"}
    if isinstance(getattr(config_cls, "layer_types", None), property):
        drop.add("layer_types")
    config = {k: v for k, v in source_config.to_dict().items() if k not in drop}
    config.update(mixer=mixer, mixer_config=dict(mixer_config or {}), attn_layers=list(attn_layers or []))
    return config_cls(**config)


def hybrid_model(config) -> nn.Module:
    """A freshly initialized hybrid for a config made by `hybrid_config_from`."""
    if config.model_type not in HYBRID_MODELS:
        raise SurgeryError(f"{config.model_type!r} is not a hybrid model type (build one with hybrid_config_from)")
    return causal_lm_loss(HYBRID_MODELS[config.model_type](config))
