"""Cross-architecture transfer (XATL, Choi 2024): a source model's embeddings, norms, MLPs, LM head (and
attention weights into the mixers) copied into a twin whose attention is a linear-cost mixer (Mamba,
Mamba-2, retention, gated linear attention) in some or all layers; the mixers train first with the copied weights
frozen, then everything trains. Sources: every family in surgery.families (GPT-2, GPT-NeoX/Pythia, Llama-style).

Importing this package registers the hybrid model types (`hybrid_gpt2`, `hybrid_gpt_neox`, `hybrid_llama`, ...)
with transformers' Auto classes.
"""

from surgery.xatl.mixers import MIXERS, build_mixer
from surgery.xatl.hybrid.model import (HYBRID_CONFIGS, HYBRID_MODELS, HybridGPT2Config, HybridGPT2LMHeadModel,
                                hybrid_config_from, hybrid_model)

__all__ = ["MIXERS", "build_mixer", "HYBRID_CONFIGS", "HYBRID_MODELS", "HybridGPT2Config", "HybridGPT2LMHeadModel",
           "hybrid_config_from", "hybrid_model"]
