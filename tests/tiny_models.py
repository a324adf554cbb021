"""The tiny random GPT-2 every test suite starts from (2 layers, d 32, 2 heads, vocabulary 64, 64 positions).

Fresh LayerNorms are all ones and zeros, which hides folding mistakes and makes every norm entry alike, so each
gain is 1 + N(0, 0.3) and each bias N(0, 0.1); embeddings are N(0, 0.5), so logits are of order 1. Dropout off,
end-of-text and beginning-of-text id 0. Any GPT2Config field can be overridden (`n_layer=3, vocab_size=80`).
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_config(**shape) -> GPT2Config:
    fields = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**fields, **shape})


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Every LayerNorm's gain to 1 + N(0, 0.3) and bias to N(0, 0.1), in place (the torch seed as it stands)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    return model


def tiny_gpt2(seed: int = 0, **shape) -> GPT2LMHeadModel:
    """A random GPT-2 in eval mode with random LayerNorm affines (see the module docstring)."""
    torch.manual_seed(seed)
    model = randomize_norms(GPT2LMHeadModel(tiny_config(**shape)))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.5)
    return model.eval()
