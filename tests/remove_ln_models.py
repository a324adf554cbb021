"""Tiny random GPT-2s for the LayerNorm-removal tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from surgery.remove_ln.points import prepare_for_removal


def tiny_gpt2(seed: int = 0, n_layer: int = 2, vocab: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # LayerNorm affines far from (1, 0), so folding mistakes show
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def all_fake(seed: int = 0, n_layer: int = 2) -> tuple[GPT2LMHeadModel, dict]:
    """A tiny GPT-2 with every LN measured on random tokens, then made fake."""
    model = tiny_gpt2(seed, n_layer)
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 64, (4, 32)))
    model.eval()
    for ln in points.values():
        ln.go_fake()
    return model, points
