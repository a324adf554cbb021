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

import sys
from dataclasses import fields

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.families import FAMILIES, HYBRID_PREFIX, family_of, get_module, set_module
from surgery.models.loss import causal_lm_loss
from surgery.xatl.hybrid.cache import (CACHE_ARG, CACHE_NAMES, LAYER_CACHE_NAMES, HybridCache, as_hybrid_cache,
                                cache_from_kwargs)
from surgery.xatl.mixers import MIXERS, build_mixer

PREFIX = HYBRID_PREFIX
# Written into every saved hybrid's config.json: transformers itself answers an unknown model type by suggesting an
# upgrade of transformers, which does not help.
HOW_TO_LOAD = ("`pip install lm-surgery`, then `import surgery` before AutoModelForCausalLM.from_pretrained: importing "
               "it registers the hybrid_* model types with transformers")


class MixerAttention(nn.Module):
    """Adapter: an attention module's call signature, `(hidden (B, T, D), ..., cache) -> (out, None)`, around a
    mixer; the cache comes under any name a family uses (`LAYER_CACHE_NAMES`), and only a `HybridCache` holds
    mixer states. Masks and position embeddings are ignored (mixers are causal by construction)."""

    def __init__(self, mixer: nn.Module, layer_idx: int):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = cache_from_kwargs(args, kwargs, names=LAYER_CACHE_NAMES)
        state = cache.mixer_states.get(self.layer_idx) if isinstance(cache, HybridCache) else None
        out, state = self.mixer(hidden_states, state)
        if isinstance(cache, HybridCache):
            cache.mixer_states[self.layer_idx] = state
        return out, None


class HybridMixin:
    """What a hybrid adds to the source family's causal LM (first in the bases, so its methods win)."""

    def __init__(self, config):
        super().__init__(config)
        n = config.num_hidden_layers
        bad = [i for i in (config.attn_layers or []) if not 0 <= i < n]
        if bad:
            raise SurgeryError(f"attn_layers {bad} out of range for a {n}-layer model")
        fam = family_of(self)
        for i, block in enumerate(get_module(self, fam.blocks)):
            if i in self.mixer_layers():
                mixer = build_mixer(config.mixer, config.hidden_size, config.num_attention_heads,
                                    **(config.mixer_config or {}))
                set_module(block, fam.attn, MixerAttention(mixer, i))

    def mixer_layers(self) -> list[int]:
        keep = set(self.config.attn_layers or [])
        return [i for i in range(self.config.num_hidden_layers) if i not in keep]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if hasattr(module, "reset_mixer_parameters"):  # after its children: the mixer's own scheme wins
            module.reset_mixer_parameters()

    def generate(self, *args, **kwargs):
        """transformers' `generate`, handed a fresh HybridCache unless a cache is given or `use_cache=False`
        (its default cache would have no place for mixer states)."""
        if all(kwargs.get(n) is None for n in CACHE_NAMES) and kwargs.get("use_cache") is not False:
            kwargs[CACHE_ARG] = HybridCache()
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """`generate`'s inputs for one step: the tokens the cache has not seen yet, and the cache under the name
        the installed transformers uses. The cache's own token count decides what to feed, whatever
        `generate` computed (its bookkeeping of linear layers has changed between versions)."""
        cache = as_hybrid_cache(cache_from_kwargs((), kwargs))
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": kwargs.get("use_cache"), CACHE_ARG: cache}
        if inputs_embeds is not None and seen == 0:
            inputs.update(input_ids=None, inputs_embeds=inputs_embeds)
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def forward(self, input_ids=None, cache=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs):
        """input_ids (B, T); every other argument of the source's forward (labels, logits_to_keep, ...) passes
        through. The cache comes as `cache` or `past_key_values`; with `use_cache`, the output's cache (field
        `CACHE_ARG`) is a HybridCache whose mixer layers hold a fixed-size state."""
        cache = as_hybrid_cache(cache_from_kwargs((cache,), {"past_key_values": past_key_values}))
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise SurgeryError("padding masks are not supported by linear-cost mixers; use unpadded inputs")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = HybridCache()
        x = input_ids if input_ids is not None else inputs_embeds
        T, device = x.shape[1], x.device
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]
        mask = None
        if cache is not None:  # additive causal mask for kept attention layers, (1, 1, T, past + T)
            dtype = self.dtype
            later = torch.arange(past + T, device=device)[None] > torch.arange(T, device=device)[:, None] + past
            mask = torch.zeros(T, past + T, device=device, dtype=dtype).masked_fill(later, torch.finfo(dtype).min)
            mask = mask[None, None]
        out = super().forward(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_ARG: cache}, **kwargs)
        if cache is not None:
            cache.seen_tokens = past + T
        out[CACHE_ARG] = cache if use_cache else None
        return out


HYBRID_CONFIGS: dict[str, type] = {}  # hybrid model type -> config class
HYBRID_MODELS: dict[str, type] = {}  # hybrid model type -> model class


def _make_hybrid(source_type: str) -> None:
    """Make, register and export the config and model classes of the hybrid of `source_type`."""
    src_config = CONFIG_MAPPING[source_type]
    src_model = MODEL_FOR_CAUSAL_LM_MAPPING[src_config]
    ns = {"__module__": __name__, "model_type": PREFIX + source_type, "mixer": "mamba", "mixer_config": None,
          "attn_layers": None, "how_to_load": HOW_TO_LOAD,
          "__annotations__": {"mixer": str, "mixer_config": dict | None, "attn_layers": list[int] | None,
                              "how_to_load": str},
          "__doc__": f"{src_config.__name__} plus `mixer` (a name in surgery.xatl.mixers.MIXERS), `mixer_config` "
                     "(its options, e.g. {'d_state': 16}) and `attn_layers` (layers that keep softmax attention)."}
    if "layer_types" not in {f.name for f in fields(src_config)}:  # a family's own layer_types stays its own
        ns["layer_types"] = property(lambda self: ["full_attention" if i in set(self.attn_layers or []) else
                                                   "linear_attention" for i in range(self.num_hidden_layers)])
    config_cls = strict(type("Hybrid" + src_config.__name__, (src_config,), ns))
    model_cls = type("Hybrid" + src_model.__name__, (HybridMixin, src_model),
                     {"__module__": __name__, "config_class": config_cls,
                      "__doc__": f"{src_model.__name__} with mixers in place of attention (see surgery.xatl.hybrid.model)."})
    for cls in (config_cls, model_cls):
        cls.__qualname__ = cls.__name__
        setattr(sys.modules[__name__], cls.__name__, cls)
    HYBRID_CONFIGS[config_cls.model_type], HYBRID_MODELS[config_cls.model_type] = config_cls, model_cls
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


for _type in [t for f in FAMILIES.values() if not f.hybrid for t in f.model_types]:
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
        family_of(source_config)  # names what is supported, or why not
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
