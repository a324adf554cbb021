"""Tiny random sources of every family and their hybrids, for the XATL tests."""

from __future__ import annotations

import torch

from surgery.families import family_of, get_module
from surgery.xatl import hybrid_config_from, hybrid_model
from remove_ln_models import tiny_model

KINDS = ("gpt2", "neox", "neox_seq", "llama")  # neox: parallel residual; llama: 4 query heads, 2 KV heads
D = 32  # width of every tiny model
# mixer options under which Q/K/V and W_O fit the mixer whole (key width d; Mamba: E = N = d)
FULL_TRANSFER = {"mamba": {"expand": 1, "d_state": D, "dt_rank": 4}, "retention": {}, "gla": {"key_dim": D}}


def source_and_hybrid(kind: str, mixer: str, attn_layers=(), options: dict | None = None, seed: int = 0):
    src = tiny_model(kind, seed)
    torch.manual_seed(seed + 1)
    opts = FULL_TRANSFER[mixer] if options is None else options
    return src, hybrid_model(hybrid_config_from(src.config, mixer, opts, list(attn_layers))).eval()


def attn(model, i: int):
    fam = family_of(model)
    return get_module(get_module(model, fam.blocks)[i], fam.attn)


def randomize_mixers(model, seed: int = 1):
    """Mixer weights of order 1 (at their initial scale a mixer's contribution, and so a lost state, is too small
    to change greedy tokens): every mixer matrix redrawn at 1/sqrt(fan-in), other mixer parameters perturbed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in model.mixer_layers():
            for name, p in attn(model, i).mixer.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if p.ndim == 2 and "A_log" not in name:
                    p.copy_(noise * p.shape[1] ** -0.5)
                else:
                    p.add_(0.3 * noise)
    return model
