"""Residual-stream checks against independent references (HF hooks, full forward passes, finite differences).

Tolerances: float32 activations, float64 sums. An exact identity measured through fp32 caches holds to
~1e-7 relative (measured 1.1e-7 to 1.6e-7), so "exact" means < 1e-5 relative; "measurably non-zero" for a model
with LayerNorm means > 1e-2 (measured 0.6 to 0.9 on these random models).
"""

from __future__ import annotations

import pytest
import torch
from lens_models import make_ln_free, tiny_gpt2

from surgery.errors import SurgeryError
from surgery.lens import load_hooked
from surgery.lens.checks import (
    attention_sink_heads,
    attention_sink_mass,
    dla_check,
    frozen_attribution,
    hf_scale_spread,
    residual_components,
    verify_ln_free,
)
from surgery.lens.patching import induction_metric, induction_prompts, patching_effects


def _tokens(vocab=64, shape=(3, 40), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _models():
    return {"ln_free": make_ln_free(tiny_gpt2()), "with_ln": tiny_gpt2()}


def test_dla_exact_for_ln_free_and_not_with_ln():
    results = {k: dla_check(load_hooked(m), _tokens()) for k, m in _models().items()}
    free, ln = results["ln_free"], results["with_ln"]
    assert free["dla_relative_error"] < 1e-5
    assert free["dla_frozen_scale_error"] < 1e-10  # same float64 arithmetic on both sides
    assert ln["dla_relative_error"] > 1e-2
    assert ln["dla_frozen_scale_error"] > 1e-2
    for r in (free, ln):  # the components add up to the residual stream, and cached-scale DLA to the logits
        assert r["residual_sum_error"] < 1e-6
        assert r["dla_cached_scale_sum_error"] < 1e-5
        assert r["n_components"] == 2 + 2 * 2 + 2 * 2  # embed, pos, heads, b_O and MLP per layer
    assert len(free["per_layer"]["dla_frozen_scale_error"]) == 3


@pytest.mark.parametrize("kind", ["ln_free", "with_ln"])
def test_last_mlp_dla_against_ablation(kind):
    """The last MLP acts on the logits only directly: zeroing its output in a full forward pass gives its direct
    effect. Frozen-scale DLA equals it for the LN-free model only. Run in float64: the effect (norm ~2) is a
    difference of logits (norm ~300), too small for a float32 comparison at 1e-5."""
    hooked = load_hooked(_models()[kind]).to(torch.float64)
    tokens, last = _tokens(), hooked.cfg.n_layers - 1
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(tokens)
        ablated = hooked.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{last}.hook_mlp_out", lambda x, hook: torch.zeros_like(x))])
    effect = (logits - ablated).double()
    labels, _, stack = residual_components(hooked, cache)
    dla, _ = frozen_attribution(hooked, cache)
    rel = ((dla(stack[labels.index(f"L{last}.mlp")]) - effect).norm() / effect.norm()).item()
    assert effect.norm() > 1e-3 * logits.norm()  # the MLP matters
    if kind == "ln_free":
        assert rel < 1e-9
    else:
        assert rel > 1e-2


def _hf_patched_metric(hf, clean, corrupted, layer, head):
    """Reference activation patching in HF: replace one head's slice of the merged z (input of attn.c_proj)."""
    d_head = hf.config.n_embd // hf.config.n_head
    sl = slice(head * d_head, (head + 1) * d_head)
    proj = hf.transformer.h[layer].attn.c_proj
    store = {}
    handle = proj.register_forward_pre_hook(lambda m, args: store.setdefault("z", args[0].clone()))
    with torch.no_grad():
        hf(corrupted)
    handle.remove()

    def patch(m, args):
        z = args[0].clone()
        z[..., sl] = store["z"][..., sl]
        return (z,)

    handle = proj.register_forward_pre_hook(patch)
    with torch.no_grad():
        patched = induction_metric(hf(clean).logits, clean).item()
    handle.remove()
    with torch.no_grad():
        return patched - induction_metric(hf(clean).logits, clean).item()


@pytest.mark.parametrize("kind", ["ln_free", "with_ln"])
def test_activation_patching_matches_hf_reference(kind):
    hf = _models()[kind]
    clean, corrupted = induction_prompts(_tokens(shape=(400,)), seg_len=10, n_prompts=6)
    assert torch.equal(clean[:, :10], clean[:, 10:]) and torch.equal(clean[:, 10:], corrupted[:, 10:])
    effects = patching_effects(load_hooked(hf), clean, corrupted)
    ref = [_hf_patched_metric(hf, clean, corrupted, layer, h) for layer in range(2) for h in range(2)]
    assert effects["activation_patching"] == pytest.approx(ref, abs=2e-5)
    assert max(abs(r) for r in ref) > 1e-4  # the heads matter at all
    assert -1.0 <= effects["correlation"] <= 1.0


def test_attribution_patching_is_the_directional_derivative():
    """attribution_h = d/de metric(z_h + e (z_corr - z_clean)) at e = 0, checked by a central difference."""
    hooked = load_hooked(make_ln_free(tiny_gpt2()))
    clean, corrupted = induction_prompts(_tokens(shape=(400,)), seg_len=10, n_prompts=6)
    effects = patching_effects(hooked, clean, corrupted)
    name, head, eps = "blocks.0.attn.hook_z", 1, 0.1
    with torch.no_grad():
        _, cache = hooked.run_with_cache(corrupted, names_filter=lambda n: n == name)
        z_corr = cache[name]

        def metric_at(e):
            def hook(z, hook):
                z = z.clone()
                z[:, :, head] = z[:, :, head] + e * (z_corr[:, :, head] - z[:, :, head])
                return z

            return induction_metric(hooked.run_with_hooks(clean, fwd_hooks=[(name, hook)]), clean).item()

        derivative = (metric_at(eps) - metric_at(-eps)) / (2 * eps)
    assert effects["attribution_patching"][head] == pytest.approx(derivative, rel=0.05, abs=2e-5)


def test_attention_sink_mass_matches_hf_attentions():
    hf = tiny_gpt2()
    hf.config._attn_implementation = "eager"
    tokens = _tokens(shape=(2, 30))
    with torch.no_grad():
        attns = hf(tokens, output_attentions=True).attentions  # per layer (batch, head, query, key)
    ref = [a[:, :, 1:, 0].mean().item() for a in attns]
    assert attention_sink_mass(attention_sink_heads(load_hooked(hf), tokens)) == pytest.approx(ref, abs=1e-6)


def test_hf_scale_spread():
    models = _models()
    assert hf_scale_spread(models["ln_free"], _tokens()) < 1e-9
    assert hf_scale_spread(models["with_ln"], _tokens()) > 0.1


def test_verify_ln_free_helper():
    result = verify_ln_free(make_ln_free(tiny_gpt2(n_layer=3, n_head=6, n_embd=48, n_positions=100, vocab_size=80)))
    assert result["dla_relative_error"] < 1e-5 and not result["has_normalization"]
    with pytest.raises(AssertionError, match="has_normalization is true"):
        verify_ln_free(tiny_gpt2())


def test_verify_ln_free_helper_catches_a_broken_export():
    """A config that claims LN-free over weights that are not: the HF model's LayerNorms still use eps 1e-5."""
    hf = tiny_gpt2()
    hf.config.surgery_ln_free, hf.config.layer_norm_epsilon = {"scale": 1e6}, 1e12
    with pytest.raises(SurgeryError, match=r"but its norms still normalize per token .*transformer\.h\.0\.ln_1 \(eps 1e-05, "):
        verify_ln_free(hf)
    del hf.config.surgery_ln_free  # without the claim it is a model with LayerNorms: the helper lists what fails
    with pytest.raises(AssertionError, match="hf_scale_spread .*has_normalization is true"):
        verify_ln_free(hf)
