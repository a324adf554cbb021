"""The generation cache of a hybrid model, and the name under which transformers passes a cache around.

transformers renamed the cache argument of `forward` and the cache field of model outputs from
`past_key_values` to `cache` (5.24; the old name is deprecated). `CACHE_ARG` is the name the installed
version uses, read from its public output class; every place that hands a cache to a model or reads one from
its output uses it, and the hybrid's `forward` accepts both names.

`HybridCache` is a `DynamicCache` (kept attention layers store keys and values through its public `update`)
that also holds each mixer layer's fixed-size recurrent state in a dict of our own, `mixer_states`, and counts
the tokens it has seen (a model with no attention layer has no keys to count).
"""

from __future__ import annotations

from dataclasses import fields

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from surgery.errors import SurgeryError

CACHE_ARG = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")


class HybridCache(DynamicCache):
    """Keys/values of attention layers (DynamicCache) + `mixer_states[layer] = (tensor, ...)`, each tensor with
    the batch as its first dimension and a size that does not depend on the number of tokens seen."""

    def __init__(self):
        super().__init__()
        self.mixer_states: dict[int, tuple[torch.Tensor, ...]] = {}
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx` of every state (attention keys/values and mixer states)."""
        if len(self.layers):
            super().reorder_cache(beam_idx)
        for i, state in self.mixer_states.items():
            self.mixer_states[i] = tuple(s.index_select(0, beam_idx.to(s.device)) for s in state)

    def nbytes(self) -> int:
        """Bytes held: mixer states plus attention keys/values, all layers, all sequences of the batch."""
        total = sum(s.numel() * s.element_size() for state in self.mixer_states.values() for s in state)
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        return total


def cache_from_kwargs(args: tuple, kwargs: dict, position: int = 0, names: tuple[str, ...] = CACHE_NAMES):
    """The cache handed to a module under one of `names` (or as the positional argument `position` of `args`)."""
    given = [kwargs[n] for n in names if kwargs.get(n) is not None]
    if len(args) > position and args[position] is not None:
        given.append(args[position])
    if len(given) > 1:
        raise SurgeryError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return given[0] if given else None


def as_hybrid_cache(cache) -> HybridCache | None:
    """`cache` itself if it is a HybridCache (or None); any other cache is refused: it has no place for
    mixer states, and continuing from it would silently drop them."""
    if cache is None or isinstance(cache, HybridCache):
        return cache
    raise SurgeryError(f"a hybrid model keeps its state in a HybridCache, not a {type(cache).__name__}: pass no "
                       "cache (one is made), surgery.xatl.hybrid.cache.HybridCache(), or the cache its forward returned")
