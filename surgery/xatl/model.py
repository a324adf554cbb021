"""A GPT-2 whose attention is replaced by a linear-cost mixer in some or all blocks.

Design: `HybridGPT2LMHeadModel` *is* a `GPT2LMHeadModel` (same module names: transformer.wte/wpe/h.i.ln_1/
attn/ln_2/mlp, transformer.ln_f, lm_head), so `surgery.families.GPT2` describes it and every GPT-2 tool
reads it. In a mixer block, `attn` is a `MixerAttention`: an adapter with GPT2Attention's call signature
around the mixer (`attn.mixer`). `forward` and `prepare_inputs_for_generation` are our own, so that
generation can keep a recurrent state: the cache is a `surgery.xatl.cache.HybridCache` (mixer layers hold a
fixed-size state, kept attention layers a KV cache), handed around under the name the installed transformers
uses (`cache` from 5.24, `past_key_values` before; both are accepted). Padding masks are not supported (the
mixers have no notion of a masked token); generation with one unpadded prompt batch is.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from surgery.errors import SurgeryError
from surgery.families import FAMILIES, GPT2
from surgery.xatl.cache import CACHE_ARG, CACHE_NAMES, HybridCache, as_hybrid_cache, cache_from_kwargs
from surgery.xatl.mixers import MIXERS, build_mixer


@strict
class HybridGPT2Config(GPT2Config):
    """GPT2Config plus: `mixer` (a name in surgery.xatl.mixers.MIXERS), `mixer_config` (its options, e.g.
    {"d_state": 16}) and `attn_layers` (block indices that keep softmax attention)."""

    model_type = "hybrid_gpt2"
    mixer: str = "mamba"
    mixer_config: dict | None = None
    attn_layers: list[int] | None = None

    @property
    def layer_types(self) -> list[str]:
        keep = set(self.attn_layers or [])
        return ["full_attention" if i in keep else "linear_attention" for i in range(self.n_layer)]


class MixerAttention(nn.Module):
    """Adapter: GPT2Attention's call signature, `(hidden (B, T, D), cache, ...) -> (out, None)`, around a
    mixer; the cache comes under either name (`CACHE_NAMES`), and only a `HybridCache` holds mixer states. The
    mask is ignored (mixers are causal by construction)."""

    def __init__(self, mixer: nn.Module, layer_idx: int):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = cache_from_kwargs(args, kwargs)
        state = cache.mixer_states.get(self.layer_idx) if isinstance(cache, HybridCache) else None
        out, state = self.mixer(hidden_states, state)
        if isinstance(cache, HybridCache):
            cache.mixer_states[self.layer_idx] = state
        return out, None


class HybridGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = HybridGPT2Config

    def __init__(self, config: HybridGPT2Config):
        super().__init__(config)
        bad = [i for i in (config.attn_layers or []) if not 0 <= i < config.n_layer]
        if bad:
            raise SurgeryError(f"attn_layers {bad} out of range for a {config.n_layer}-layer model")
        for i, block in enumerate(self.transformer.h):
            if config.layer_types[i] == "linear_attention":
                mixer = build_mixer(config.mixer, config.n_embd, config.n_head, **(config.mixer_config or {}))
                block.attn = MixerAttention(mixer, i)

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

    def mixer_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.config.layer_types) if t == "linear_attention"]

    def forward(self, input_ids=None, cache=None, attention_mask=None, position_ids=None,
                labels=None, use_cache=None, inputs_embeds=None, logits_to_keep: int = 0, past_key_values=None,
                **kwargs):
        """input_ids (B, T). The cache comes as `cache` or `past_key_values` (`CACHE_NAMES`); with `use_cache`,
        the output's cache (field `CACHE_ARG`) is a HybridCache whose mixer layers hold a fixed-size state."""
        past_key_values = as_hybrid_cache(cache_from_kwargs((cache,), {"past_key_values": past_key_values}))
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise SurgeryError("padding masks are not supported by linear-cost mixers; use unpadded inputs")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = HybridCache()
        tr = self.transformer
        x = tr.wte(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        x = tr.drop(x + tr.wpe(position_ids))
        mask = None
        if T > 1:  # additive causal mask for the attention layers, (1, 1, T, past + T)
            q = torch.arange(T, device=x.device)[:, None] + past
            mask = torch.zeros(T, past + T, device=x.device, dtype=x.dtype)
            mask = mask.masked_fill(torch.arange(past + T, device=x.device)[None] > q, torch.finfo(x.dtype).min)[None, None]
        for block in tr.h:
            x = block(x, attention_mask=mask, use_cache=use_cache, **{CACHE_ARG: past_key_values})
        x = tr.ln_f(x)
        if past_key_values is not None:
            past_key_values.seen_tokens = past + T
        logits = self.lm_head(x if not logits_to_keep else x[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: past_key_values if use_cache else None})


def hybrid_config_from(source_config: GPT2Config, mixer: str, mixer_config: dict | None = None,
                       attn_layers: list[int] | None = None) -> HybridGPT2Config:
    """The hybrid twin of a GPT-2 config: same width, depth, vocabulary, positions and LN epsilon
    (so an LN-free source stays LN-free); extra fields such as `surgery_ln_free` are kept."""
    if mixer not in MIXERS:
        raise SurgeryError(f"unknown mixer {mixer!r}; choose one of: {', '.join(sorted(MIXERS))}")
    fields = {k: v for k, v in source_config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "layer_types", "auto_map")}
    fields.update(mixer=mixer, mixer_config=dict(mixer_config or {}), attn_layers=list(attn_layers or []))
    return HybridGPT2Config(**fields)


AutoConfig.register(HybridGPT2Config.model_type, HybridGPT2Config, exist_ok=True)
AutoModelForCausalLM.register(HybridGPT2Config, HybridGPT2LMHeadModel, exist_ok=True)
# Same module layout as GPT-2, so surgeries find its parts through the family registry.
if "hybrid_gpt2" not in FAMILIES:
    from dataclasses import replace

    FAMILIES["hybrid_gpt2"] = replace(GPT2, name="hybrid_gpt2", model_types=("hybrid_gpt2",))
