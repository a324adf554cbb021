"""TransformerLens for Qwen3, Gemma 3 and OLMo 2 (tests/norm_family_models.py: randomized parameters).

LN-free exports convert natively with no normalization: every QK-norm, post-norm and (1 + weight) gain folded, Gemma's
sqrt(d) embedding scale in W_E, its query scale as attn_scale, its two rotary bases per layer type. The checks are
`verify_ln_free`'s gates: HF vs TransformerLens logits within 1e-4 (fp32, logits of order 10), DLA exact to 1e-5,
the HF norms' per-token divisor constant to 1e-6. Models with their norms go through TransformerLens' own adapter:
logits within 1e-4, a hook_scale at every norm, the QK-norms' included.
"""

import pytest

from norm_family_models import KINDS, random_tokens, tiny_norm_family
from norm_family_models import tiny_ln_free as ln_free
from surgery.errors import SurgeryError
from surgery.lens import has_normalization, load_hooked, tl_config, tl_state_dict
from surgery.lens.checks import dla_check, logit_agreement, verify_ln_free
from surgery.lens.hooked import hooked_transformer_config
from surgery.models.loading import load_tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_an_ln_free_export_loads_with_no_normalization_and_exact_dla(kind):
    result = verify_ln_free(ln_free(kind), random_tokens(2, 16, seed=3))
    assert not result["has_normalization"] and result["dla_relative_error"] < 1e-5


def test_gemma3_layers_keep_their_own_rotary_base_and_query_scale():
    cfg = tl_config(tiny_norm_family("gemma3").config, ln_free=True)
    assert cfg["layer_rotary_bases"] == [10000.0, 1000000.0] and cfg["rotary_base"] == 10000.0
    assert cfg["attn_scale"] == pytest.approx(12**0.5)
    with pytest.raises(SurgeryError, match="layers rotate with different bases .*load it with TransformerLens 4"):
        hooked_transformer_config(cfg)


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_with_its_norms_loads_through_transformer_lens_own_adapter(kind):
    model = tiny_norm_family(kind)
    hooked = load_hooked(model, tokenizer=load_tokenizer("checkpoints/tiny-llama-stdlib"))
    assert has_normalization(hooked) and "blocks.0.attn.q_norm.hook_scale" in hooked.hook_dict
    assert logit_agreement(model, hooked, random_tokens())["hf_tl_max_abs_logit_diff"] < 1e-4
    assert "Norm" in type(model.model.layers[0].self_attn.q_norm).__name__  # the adapter wrapped a copy


def test_dla_of_a_bias_free_model_with_its_norms_sums_its_components_to_the_residual():
    """TransformerLens' adapter gives bias-free attention no b_O: the decomposition leaves it out, and its components
    still add up to the final residual (pre-norms only, so each sublayer's output is what the residual receives)."""
    hooked = load_hooked("checkpoints/tiny-qwen3-stdlib")
    assert hooked.blocks[0].attn.b_O is None
    result = dla_check(hooked, random_tokens(2, 16, seed=4))
    assert result["residual_sum_error"] < 1e-6 and result["n_components"] == 1 + 4 * (4 + 1)  # embed; heads, MLP
    assert result["dla_relative_error"] > 1e-4  # the RMSNorm's per-token scale: attribution is not exact with norms


def test_a_model_with_its_norms_needs_a_tokenizer_and_no_native_weights():
    model = tiny_norm_family("qwen3")
    with pytest.raises(SurgeryError, match="loads through TransformerLens' adapter, which needs a tokenizer: pass tokenizer="):
        load_hooked(model)
    with pytest.raises(SurgeryError, match="normalizes queries/keys or sublayer outputs.*load it with surgery.lens.load_hooked"):
        tl_state_dict(model, ln_free=False)


def test_a_soft_capped_gemma_is_refused_naming_the_caps():
    model = tiny_norm_family("gemma3")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(SurgeryError, match=r"gemma3 soft caps \{'final_logit_softcapping': 30.0\} .*set them to None"):
        tl_config(model.config, ln_free=True)
