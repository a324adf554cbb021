"""The hybrid classes themselves: a source family's causal LM with mixers in place of attention in some layers.

This module travels with every saved hybrid (surgery.xatl.hybrid.portable): it imports torch, transformers and
modules that travel with it (the mixers, the cache, the error type), never a family table. What it needs to
know about a family (where its blocks and attention modules are, under which names a decoder layer hands the
cache to attention) is given to `make_hybrid_classes` by the caller: `surgery.xatl.hybrid.model` reads it from
`surgery.families`, a saved model's generated module has it written in.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

from surgery.errors import SurgeryError
from surgery.xatl.hybrid.cache import CACHE_ARG, CACHE_NAMES, HybridCache, as_hybrid_cache, cache_from_kwargs
from surgery.xatl.mixers import build_mixer


def call_mixer(mixer: nn.Module, x: torch.Tensor, state=None, position_embeddings=None):
    """mixer(x, state), handing it the source's rotary (cos, sin) when it rotates its window by them."""
    if getattr(mixer, "window_rotary", False):
        return mixer(x, state, position_embeddings=position_embeddings)
    return mixer(x, state)


class MixerAttention(nn.Module):
    """Adapter: an attention module's call signature, `(hidden (B, T, D), ..., cache) -> (out, None)`, around a
    mixer; the cache comes under any of `cache_names`, and only a `HybridCache` holds mixer states. Masks and
    position embeddings reach only a mixer that rotates its window by them (mixers are causal by construction)."""

    def __init__(self, mixer: nn.Module, layer_idx: int, cache_names: tuple[str, ...] = CACHE_NAMES):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx
        self.cache_names = cache_names

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = cache_from_kwargs(args, kwargs, names=self.cache_names)
        state = cache.mixer_states.get(self.layer_idx) if isinstance(cache, HybridCache) else None
        out, state = call_mixer(self.mixer, hidden_states, state, kwargs.get("position_embeddings"))
        if isinstance(cache, HybridCache):
            cache.mixer_states[self.layer_idx] = state
        return out, None


class HybridMixin:
    """What a hybrid adds to the source family's causal LM (first in the bases, so its methods win). Class
    attributes set by `make_hybrid_classes`: `hybrid_blocks` (dotted path of the block list), `hybrid_attn`
    (path of attention in a block), `hybrid_cache_names` (names a block hands the cache to attention under)."""

    hybrid_blocks: str
    hybrid_attn: str
    hybrid_cache_names: tuple[str, ...] = CACHE_NAMES

    def __init__(self, config):
        super().__init__(config)
        n = config.num_hidden_layers
        bad = [i for i in (config.attn_layers or []) if not 0 <= i < n]
        if bad:
            raise SurgeryError(f"attn_layers {bad} out of range for a {n}-layer model")
        parent, _, name = self.hybrid_attn.rpartition(".")
        for i, block in enumerate(self.get_submodule(self.hybrid_blocks)):
            if i in self.mixer_layers():
                mixer = build_mixer(config.mixer, config.hidden_size, config.num_attention_heads,
                                    **(config.mixer_config or {}))
                setattr(block.get_submodule(parent) if parent else block, name,
                        MixerAttention(mixer, i, self.hybrid_cache_names))

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


def make_hybrid_classes(source_type: str, blocks: str, attn: str, cache_names: tuple[str, ...] = CACHE_NAMES,
                        how_to_load: str = "", module: str = __name__, bases: tuple[type, ...] = ()) -> tuple[type, type]:
    """(config class, model class) of the hybrid of transformers model type `source_type` (model type
    `hybrid_<source_type>`), both defined as attributes of `module`. `blocks`, `attn`: where the family keeps its
    block list and each block's attention; `cache_names`: what a block calls the cache it hands to attention;
    `bases`: mixins placed before HybridMixin in the model class's bases."""
    src_config = CONFIG_MAPPING[source_type]
    src_model = MODEL_FOR_CAUSAL_LM_MAPPING[src_config]
    ns = {"__module__": module, "model_type": "hybrid_" + source_type, "mixer": "mamba", "mixer_config": None,
          "attn_layers": None, "how_to_load": how_to_load,
          "__annotations__": {"mixer": str, "mixer_config": dict | None, "attn_layers": list[int] | None,
                              "how_to_load": str},
          "__doc__": f"{src_config.__name__} plus `mixer` (a mixer's name), `mixer_config` (its options, e.g. "
                     "{'d_state': 16}) and `attn_layers` (layers that keep softmax attention)."}
    if "layer_types" not in {f.name for f in fields(src_config)}:  # a family's own layer_types stays its own
        ns["layer_types"] = property(lambda self: ["full_attention" if i in set(self.attn_layers or []) else
                                                   "linear_attention" for i in range(self.num_hidden_layers)])
    config_cls = strict(type("Hybrid" + src_config.__name__, (src_config,), ns))
    model_cls = type("Hybrid" + src_model.__name__, (*bases, HybridMixin, src_model),
                     {"__module__": module, "config_class": config_cls, "hybrid_blocks": blocks,
                      "hybrid_attn": attn, "hybrid_cache_names": tuple(cache_names),
                      "__doc__": f"{src_model.__name__} with mixers in place of attention."})
    for cls in (config_cls, model_cls):
        cls.__qualname__ = cls.__name__
        setattr(sys.modules[module], cls.__name__, cls)
    return config_cls, model_cls
