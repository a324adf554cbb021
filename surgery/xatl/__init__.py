"""Cross-architecture transfer (XATL, Choi 2024): GPT-2's embeddings, LayerNorms, MLPs and LM head copied
into a model whose attention is a linear-cost mixer (Mamba, retention, gated linear attention); the
mixers train first with the copied weights frozen, then everything trains.

Importing this package registers `hybrid_gpt2` with transformers' Auto classes.
"""

from surgery.xatl.mixers import MIXERS, build_mixer
from surgery.xatl.model import HybridGPT2Config, HybridGPT2LMHeadModel, hybrid_config_from

__all__ = ["MIXERS", "build_mixer", "HybridGPT2Config", "HybridGPT2LMHeadModel", "hybrid_config_from"]
