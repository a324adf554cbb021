"""The loss a causal LM trains with, named where transformers cannot tell it from the class name.

Kept apart from `loading` (which imports transformers): the hybrid model imports it while transformers may still be
importing, when `import surgery` registers the hybrids right after transformers loads.
"""

from __future__ import annotations


def causal_lm_loss(model):
    """Name the next-token loss for a causal LM whose class name transformers cannot map to one (GPT-2's
    `GPT2LMHeadModel`): transformers then uses that same loss, after warning once that `loss_type=None` is unknown."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model
