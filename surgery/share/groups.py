"""Which layers share a block, and which original layers a shared block starts from."""

from __future__ import annotations

from typing import Literal

from surgery.errors import SurgeryError

Init = Literal["average", "first", "stepwise"]
INITS = ("average", "first", "stepwise")


def block_of_layer(groups: str | list[int], n_layers: int) -> list[int]:
    """The shared block each layer reads, as a list of n_layers block ids 0..K-1.

    groups: "cycle:K" (layer l reads block l mod K: K unique blocks looped n_layers/K times, as in recursive
    transformers), "contiguous:K" (K runs of consecutive layers, e.g. "contiguous:2" of 4 layers: [0, 0, 1, 1]),
    or an explicit list of block ids, one per layer.
    """
    if isinstance(groups, (list, tuple)):
        ids = [int(b) for b in groups]
        if len(ids) != n_layers:
            raise SurgeryError(f"share.groups lists {len(ids)} block ids for a {n_layers}-layer model: give one per layer")
        if sorted(set(ids)) != list(range(len(set(ids)))):
            raise SurgeryError(f"share.groups {ids}: block ids must be 0..K-1 with none skipped")
        return ids
    kind, _, k = str(groups).partition(":")
    if kind not in ("cycle", "contiguous") or not k.isdigit():
        raise SurgeryError(f"share.groups={groups!r}: write 'cycle:K', 'contiguous:K' or a list of block ids per layer")
    k = int(k)
    if not 1 <= k <= n_layers:
        raise SurgeryError(f"share.groups={groups!r}: K must be between 1 and the model's {n_layers} layers")
    return [l % k for l in range(n_layers)] if kind == "cycle" else [l * k // n_layers for l in range(n_layers)]


def members(block_ids: list[int]) -> list[list[int]]:
    """The layers reading each block, block by block."""
    return [[l for l, b in enumerate(block_ids) if b == k] for k in range(max(block_ids) + 1)]


def init_layers(block_ids: list[int], init: Init) -> list[list[int]]:
    """The original layers each shared block's weights are made from (averaged when several).

    average: every layer of the group; first: the group's first layer (Bae et al.'s "lower" for a cycle);
    stepwise: layer round(k * L / K) for block k (Bae et al.: every (L/K)-th layer of the original)."""
    groups = members(block_ids)
    if init == "average":
        return groups
    if init == "first":
        return [g[:1] for g in groups]
    if init == "stepwise":
        n, k = len(block_ids), len(groups)
        return [[min(n - 1, round(b * n / k))] for b in range(k)]
    raise SurgeryError(f"share.init={init!r}: choose one of {', '.join(INITS)}")
