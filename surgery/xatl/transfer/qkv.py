"""A source block's query, key and value projections as three (out, in) weights in query-head order, whatever
the family's layout (`Family.qkv_layout`), for transfer into a mixer.

- fused (GPT-2's Conv1D): rows [Q | K | V] of one projection;
- fused_per_head (GPT-NeoX's query_key_value): rows [q_h, k_h, v_h] per head h, de-interleaved here into
  Q = [q_0 .. q_H-1], K and V likewise;
- separate (Llama-style): q, k, v projections; with grouped-query attention K and V have fewer heads than Q
  and each KV head is repeated for the query heads that share it (query head h reads KV head h // (H / H_kv),
  as transformers' `repeat_kv` does), so every mixer head gets the key and value its query head attended with;
  a mixer that groups its key/value inputs like the source (mamba2's x and B) takes them unrepeated.

Both fused layouts put each run of value rows (`Family.value_outputs`) right after a run of key rows of the same
length, and that after the query rows: Q/K rows are found from the value rows by that shift, so this reads
the layout from the family registry, not from a model's attribute names.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import Family, get_module, in_out_weight


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of an nn.Linear or a GPT-2 Conv1D."""
    return in_out_weight(module).T, getattr(module, "bias", None)


def fused_rows(family: Family, config) -> dict[str, torch.Tensor]:
    """{"q", "k", "v": output row indices of a fused Q/K/V projection, in head order}."""
    v = family.value_outputs(config).nonzero().squeeze(1)
    run = int((v.diff() != 1).nonzero()[0, 0]) + 1 if (v.diff() != 1).any() else len(v)  # rows per value run
    return {"q": v - 2 * run, "k": v - run, "v": v}


def repeat_kv_rows(t: torch.Tensor | None, n_kv: int, groups: int) -> torch.Tensor | None:
    """(n_kv * hd, ...) -> (n_kv * groups * hd, ...): each KV head's rows repeated `groups` times in place."""
    if t is None or groups == 1:
        return t
    return t.reshape(n_kv, -1, *t.shape[1:]).repeat_interleave(groups, dim=0).reshape(-1, *t.shape[1:])


def qkv_weights(block: nn.Module, family: Family, config, prefix: str, kv_heads: int | None = None) -> dict[str, tuple]:
    """{"q": (weight (H * hd, d), bias or None, source name, note), "k", "v": the same with kv_heads * hd rows} of
    one source block; `prefix` is the block's path (for names). `kv_heads`: the key/value heads the target takes
    (default H, one per query head): the source's K/V heads are repeated to that many."""
    heads = config.num_attention_heads
    if family.qkv_layout == "separate":
        parts = {key: (*linear_parts(get_module(block, path)), f"{prefix}.{path}", "")
                 for key, path in zip("qkv", family.qkv)}
    else:
        w, b = linear_parts(get_module(block, family.qkv[0]))
        note = "de-interleaved from per-head [q, k, v]" if family.qkv_layout == "fused_per_head" else ""
        parts = {key: (w[rows], None if b is None else b[rows], f"{prefix}.{family.qkv[0]}[{key.upper()}]", note)
                 for key, rows in fused_rows(family, config).items()}
    head_dim = parts["q"][0].shape[0] // heads
    n_kv = parts["k"][0].shape[0] // head_dim
    if heads % n_kv or parts["v"][0].shape[0] != n_kv * head_dim:
        raise SurgeryError(f"{prefix}: {heads} query heads of width {head_dim} cannot share "
                           f"{parts['k'][0].shape[0]} key / {parts['v'][0].shape[0]} value rows")
    kv_heads = kv_heads or heads
    if kv_heads % n_kv or heads % kv_heads:
        raise SurgeryError(f"{prefix}: the target groups keys/values in {kv_heads} heads, the source has {n_kv} "
                           f"K/V heads and {heads} query heads: give the mixer n_kv_head={n_kv} (or {heads})")
    groups = kv_heads // n_kv
    for key in "kv":
        w, b, name, note = parts[key]
        if groups > 1:
            note = f"{n_kv} KV heads repeated x{groups} for {kv_heads} query heads"
        parts[key] = (repeat_kv_rows(w, n_kv, groups), repeat_kv_rows(b, n_kv, groups), name, note)
    return parts
