"""`hooked_config_and_weights`: a HookedTransformerConfig and weights that a user loads into their own
TransformerLens 3.x `HookedTransformer`, for every family, LN-free and with norms.

TransformerLens 4.0 removed HookedTransformer, so with 4.x (the lock) only the refusal runs here; `bash .ci/tl3`
runs this file against TransformerLens 3.x. Tolerances as in test_lens_families: HF and TransformerLens compute the
same float32 function in a different order (measured differences ~1e-7 on logits of magnitude ~1); we allow 1e-5
absolute and 1e-5 relative (the requirement is 1e-4 relative).
"""

from __future__ import annotations

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.lens import hooked_config_and_weights
from surgery.lens.hooked import BUFFERS, transformer_lens_major
from remove_ln_models import tiny_model
from test_lens_families import exported

TL3 = transformer_lens_major() < 4
needs_tl3 = pytest.mark.skipif(not TL3, reason="HookedTransformer exists only in TransformerLens 3.x (bash .ci/tl3)")
KINDS = ["gpt2", "neox", "neox_seq", "llama"]


def _build(hf):
    from transformer_lens import HookedTransformer

    cfg, state = hooked_config_and_weights(hf)
    model = HookedTransformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.endswith(BUFFERS) for k in missing)  # only what the model builds itself
    return cfg, model.eval()


def _assert_same_logits(hf, model):
    tokens = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = hf(tokens).logits, model(tokens)
    assert out.shape == ref.shape and ref.abs().max().item() > 0.3
    assert (ref - out).abs().max().item() < 1e-5
    assert ((ref - out).norm() / ref.norm()).item() < 1e-5


@needs_tl3
@pytest.mark.parametrize("kind", KINDS)
def test_ln_free_export_builds_a_hooked_transformer_without_normalization(kind):
    hf = exported(kind)
    cfg, model = _build(hf)
    assert cfg.normalization_type is None
    assert not [name for name in model.hook_dict if name.endswith(("hook_scale", "hook_normalized"))]
    _assert_same_logits(hf, model)


@needs_tl3
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_model_with_norms_keeps_them(kind):
    hf = tiny_model(kind)
    cfg, model = _build(hf)
    assert cfg.normalization_type == ("RMS" if kind == "llama" else "LN")
    assert "blocks.0.ln1.hook_scale" in model.hook_dict
    _assert_same_logits(hf, model)


@needs_tl3
def test_grouped_query_weights_keep_their_key_value_heads():
    cfg, state = hooked_config_and_weights(exported("llama"))
    assert (cfg.n_heads, cfg.n_key_value_heads) == (4, 2)
    assert state["blocks.0.attn._W_K"].shape == (2, 32, 8) and "blocks.0.attn.W_K" not in state
    assert "blocks.0.mlp.b_gate" not in state  # HookedTransformer's gated MLP has no gate bias


@pytest.mark.skipif(TL3, reason="TransformerLens 4.x refuses; 3.x builds")
def test_transformer_lens_4_is_refused_with_what_to_use_instead():
    with pytest.raises(SurgeryError, match=r"HookedTransformer was removed in TransformerLens 4.0 \(installed: 4.x\); "
                                           r"install transformer_lens>=3.9,<4 for it, or use surgery.lens.load_hooked"):
        hooked_config_and_weights(exported("gpt2"))
