"""TransformerLens conversion of every supported family, and the residual-stream checks run on it.

- `surgery.lens.convert`: HF model -> TransformerLens config and weights, LN-free models folded to no normalization;
- `surgery.lens.load`: `load_hooked`, the one entry point, for TransformerLens 4.x and 3.x;
- `surgery.lens.hooked`: `hooked_config_and_weights`, a HookedTransformerConfig and weights to build one's own
  TransformerLens 3.x `HookedTransformer`;
- `surgery.lens.checks`: HF-vs-TransformerLens logits, direct logit attribution, scale spread, attention sinks;
- `surgery.lens.patching`: activation and attribution patching on induction prompts;
- `surgery.lens.analyses`: the LN-removal papers' analyses (calibration, first-position norm, sinks, entropy neurons);
- `surgery.lens.expressivity`: what a LayerNorm gives attention (Brody et al. 2023): unselectable keys, the
  all-ones component of the attention input, attention entropy relative to uniform;
- `surgery.lens.report`: every check of one model, and the report of `surgery verify`.
"""

from surgery.lens.convert import measured_ln_free, norm_eps, tl_config, tl_state_dict
from surgery.lens.hooked import hooked_config_and_weights, transformer_lens_version
from surgery.lens.load import has_normalization, load_hf, load_hooked

__all__ = [
    "has_normalization",
    "hooked_config_and_weights",
    "load_hf",
    "load_hooked",
    "measured_ln_free",
    "norm_eps",
    "tl_config",
    "tl_state_dict",
    "transformer_lens_version",
]
