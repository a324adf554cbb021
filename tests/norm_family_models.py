"""Tiny random Qwen3, Gemma 3 and OLMo 2 models (QK-norms, sandwich norms, post-norms) for the tests of the norm
kinds beyond pre-norms. Every parameter is randomized away from its initial value: norm gains in [0.3, 3] (so a
gain folded into the wrong rows, or Gemma's `(1 + weight)` read as `weight`, shows), projection biases nonzero
(`attention_bias`), and untied heads."""

from __future__ import annotations

import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, Olmo2Config, Olmo2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from surgery.families import family_of, is_norm

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6, attention_bias=True,
              tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0)
# Gemma 3: sliding and full layers (the default pattern has 5 sliding per full; 2 layers: both sliding) with their own
# rope bases, a query scale that is not d_head, and a window above the test sequences' length.
MODELS = {
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, query_pre_attn_scalar=12, sliding_window=64,
                                                         layer_types=["sliding_attention", "full_attention"])),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**COMMON)),
}
KINDS = list(MODELS)


def tiny_norm_family(kind: str, seed: int = 0):
    """A tiny model of `kind` in eval mode with randomized parameters (module docstring)."""
    torch.manual_seed(seed)
    model = MODELS[kind]()
    offset = family_of(model).norm_gain_offset
    with torch.no_grad():
        for module in model.modules():
            if is_norm(module):
                module.weight.uniform_(0.3, 3.0).sub_(offset)  # the gain the norm multiplies by, in [0.3, 3]
                continue
            for name, p in module.named_parameters(recurse=False):
                p.normal_(0.0, 0.2 if name == "weight" else 0.1)
    return model.eval()


def random_tokens(n: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def tiny_ln_free(kind: str):
    """The LN-free export of `tiny_norm_family(kind)`: every removal point fake at the scale one training forward
    measured, folded by `export_ln_free`."""
    from surgery.remove_ln.export import export_ln_free
    from surgery.remove_ln.points import prepare_for_removal, token_context

    model = tiny_norm_family(kind)
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        model(random_tokens(4, 24))
    token_context(points).flush()
    for ln in points.values():
        ln.go_fake()
    return export_ln_free(model.eval())
