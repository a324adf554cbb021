"""Tiny random models (GPT-2, and one per family layout) for the norm-removal tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, LlamaConfig

from surgery.remove_ln.points import prepare_for_removal
from tiny_models import tiny_gpt2

__all__ = ["tiny_gpt2", "all_fake", "FAMILY_CONFIGS", "tiny_model"]


def all_fake(seed: int = 0, n_layer: int = 2) -> tuple[GPT2LMHeadModel, dict]:
    """A tiny GPT-2 with every LN measured on random tokens, then made fake."""
    model = tiny_gpt2(seed, n_layer=n_layer)
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 64, (4, 32)))
    model.eval()
    for ln in points.values():
        ln.go_fake()
    return model, points


FAMILY_CONFIGS = {  # one tiny config per family layout; "neox" has a parallel residual, "neox_seq" not
    "gpt2": lambda v: GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=v, n_positions=64, eos_token_id=0, bos_token_id=0),
    "neox": lambda v: GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                    vocab_size=v, max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True,
                                    tie_word_embeddings=False, eos_token_id=0, bos_token_id=0),
    "neox_seq": lambda v: GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                        vocab_size=v, max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=False,
                                        tie_word_embeddings=False, eos_token_id=0, bos_token_id=0),
    "llama": lambda v: LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, vocab_size=v, max_position_embeddings=64, tie_word_embeddings=True,
                                   eos_token_id=0, bos_token_id=0),
}


def tiny_model(kind: str, seed: int = 0, vocab: int = 64, layers: int | None = None):
    """A tiny random model of one family layout with every parameter perturbed (norm gains far from 1, biases
    far from 0), so that a mistake in which outputs read which norm shows. `layers`: other than the layout's 2."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[kind](vocab)
    if layers is not None:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()
