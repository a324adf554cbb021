"""LoRA, prefix-tuning and their combinations with LN-tuning (Qi et al. 2022, the "unified framework"), built on PEFT.

    lora         LoRA on the attention input projections (a fused Q/K/V whole; separate q and v, as the LoRA paper)
    lora-mlp     LoRA on every MLP projection (in, gate where there is one, out)
    prefix       prefix-tuning (`PrefixTuningConfig`): trained keys and values prepended in every layer
    ln+<method>  <method> plus every norm (LayerNorm gains and biases, RMSNorm gains)

The norms of an `ln+` method train as PEFT `modules_to_save`: a trainable copy of each norm module beside the
frozen original, saved with the adapter, so `PeftModel.from_pretrained(base, dir)` restores the whole run with plain
PEFT. The task head (if any) trains fully in every method. One PEFT config per method: no mixed adapters needed.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import block_part_paths, layout_of
from surgery.ln_tune.params import head_modules, norm_modules, registry_family
from surgery.models.ln_free import model_name

PEFT_METHODS = ("lora", "lora-mlp", "prefix", "ln+lora", "ln+lora-mlp", "ln+prefix")


def lora_targets(model: nn.Module, side: str = "attn") -> list[str]:
    """Full module paths LoRA adapts. side "attn": a fused Q/K/V projection whole (GPT-2 `c_attn`, GPT-NeoX
    `query_key_value`), else the query and value projections (Llama `q_proj`, `v_proj`; BERT `query`, `value`);
    side "mlp": every MLP projection (`mlp_in` and `mlp_out` of `surgery.families`)."""
    if side == "mlp":
        return block_part_paths(model, "mlp_in") + block_part_paths(model, "mlp_out")
    layout, _ = layout_of(model)
    paths = block_part_paths(model, "qkv")
    if len(layout.qkv) == 3:  # separate q, k, v: q and v
        return [p for p in paths if not p.endswith("." + layout.qkv[1])]
    return paths


def takes_prefix(model: nn.Module, head: str | list[str] | None = "auto") -> bool:
    """Whether PEFT builds prefix-tuning for `model`: a causal LM (no task head) of a `surgery.families` family, to
    which PEFT hands the prefix as the attention cache. Not a classifier: PEFT's classification path looks for a
    `past_key_values` argument that transformers 5 models no longer have (they take `cache`); not an encoder."""
    return registry_family(model) is not None and not head_modules(model, head)


def peft_method(model: nn.Module, method: str, head: str | list[str] | None = "auto", *, lora_r: int = 8,
                lora_alpha: int = 16, prefix_tokens: int = 8) -> nn.Module:
    """`get_peft_model(model, config)` for one of `PEFT_METHODS`; the head modules and, for `ln+` methods, every norm
    module train as `modules_to_save`. prefix_tokens: virtual tokens per layer (each a key and a value)."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if method not in PEFT_METHODS:
        raise SurgeryError(f"{method!r} is not a PEFT method here; choose from {', '.join(PEFT_METHODS)}")
    base = method.removeprefix("ln+")
    saved = head_modules(model, head) + (list(norm_modules(model)) if method.startswith("ln+") else [])
    if base == "prefix":
        if not takes_prefix(model, head):
            raise SurgeryError(
                f"PEFT builds prefix-tuning here only for a causal LM of GPT-2, GPT-NeoX or Llama layout (it passes "
                f"the prefix as the attention cache); {type(model).__name__} ({model_name(model)!r}) is not one, so "
                f"PEFT cannot build {method!r}: use {'ln+lora' if method.startswith('ln+') else 'lora'} on it instead")
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_tokens,
                                    modules_to_save=saved or None)
    else:
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, modules_to_save=saved or None,
                            target_modules=lora_targets(model, "mlp" if base == "lora-mlp" else "attn"))
    return get_peft_model(model, config)


@torch.no_grad()
def init_prefix(model: nn.Module, ids: torch.Tensor) -> None:
    """Start prefix-tuning from the model's own keys and values of real tokens (Li & Liang 2021 found this better than
    random): `ids` (num_virtual_tokens,) run through the base model, and each layer's cached keys and values
    (after rotary, with grouped KV heads as stored) become PEFT's prefix, so the adapted model starts as the base
    model reading `ids` first. PEFT's own start, N(0, 1) entries, raises the tiny LMs' held-out loss by ~0.5 nats/token
    before any step. `model`: a PEFT prefix-tuning model."""
    out = model.get_base_model()(input_ids=ids[None], use_cache=True)
    cache = out.get("cache") or out.get("past_key_values")
    parts = [kv[0].transpose(0, 1).reshape(len(ids), -1) for layer in cache.layers for kv in (layer.keys, layer.values)]
    prefix = model.prompt_encoder[model.active_adapter].embedding.weight
    flat = torch.cat(parts, dim=-1)
    if flat.shape != prefix.shape:
        raise SurgeryError(f"the cached keys and values of {len(ids)} tokens have shape {tuple(flat.shape)}, PEFT's prefix "
                           f"{tuple(prefix.shape)}: pass as many ids as num_virtual_tokens")
    prefix.copy_(flat.to(prefix.dtype))
