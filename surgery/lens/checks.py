"""Residual-stream checks on a TransformerLens model loaded by `surgery.lens.load_hooked`.

Shapes: tokens (batch, pos); residual vectors (..., d_model); logits (..., d_vocab). Works with a
TransformerLens 4.x `TransformerBridge` or a 3.x `HookedTransformer` (same hook names and W_* properties).

Direct logit attribution (DLA). The final residual stream is a sum of components c: token and position
embeddings, every attention head (z_h @ W_O[h]), every attention output bias b_O (where there is one), every MLP output.
Rotary models have no position embedding component.
- The true direct contribution of c is `DE_c = f(r) - f(r - c)`: the change of the logits when c alone is
  removed from the final residual r, with f = final norm (if any) + unembedding recomputed.
- The frozen-scale attribution is the usual linearization with the cached `ln_final.hook_scale`:
  `DLA_c = (c - mean(c)) / scale * w_f @ W_U` (no centering after an RMSNorm; `c @ W_U` without normalization).
`dla_relative_error` = ||sum_c DE_c + f(0) - logits|| / ||logits||: zero up to float error exactly when f is
affine (an LN-free model), and the size of the interaction the per-token scale adds otherwise.
`dla_frozen_scale_error` = sum_c ||DLA_c - DE_c|| / sum_c ||DE_c||: how wrong the frozen-scale DLA of each
component is. (The sum of the DLA_c with the *cached* scale equals the logits by construction for both kinds
of model, `dla_cached_scale_sum_error`, so it cannot tell them apart.) Sums run in float64.
"""

from __future__ import annotations

import torch


def final_norm_params(hooked) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(w, b) of the final norm (b None for an RMSNorm), or None for a model without normalization."""
    sd = hooked.state_dict()
    for w, b in (("ln_final.weight", "ln_final.bias"), ("ln_final.w", "ln_final.b")):
        if w in sd:
            return sd[w], sd.get(b)
    return None


def _is_rms(hooked) -> bool:
    return (hooked.cfg.normalization_type or "").upper().startswith("RMS")


def final_map(hooked):
    """f(r): final residual (..., d_model) -> logits (..., d_vocab), in float64, recomputing the final norm
    (LayerNorm: centered, divided by sqrt(var + eps); RMSNorm: divided by sqrt(mean(r^2) + eps))."""
    w_u, b_u = hooked.W_U.detach().double(), hooked.b_U.detach().double()
    norm = final_norm_params(hooked)
    if norm is None:
        return lambda r: r @ w_u + b_u
    w, b = (None if t is None else t.detach().double() for t in norm)
    eps, rms = hooked.cfg.eps, _is_rms(hooked)

    def f(r):
        r = r if rms else r - r.mean(-1, keepdim=True)
        out = r / (r.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w
        return (out if b is None else out + b) @ w_u + b_u

    return f


def residual_components(hooked, cache) -> tuple[list[str], list[int], torch.Tensor]:
    """(labels, layer of each (-1 for embeddings), stack (n_components, batch, pos, d_model) in float64).
    Rotary models have no position embedding component."""
    labels, layers, parts = ["embed"], [-1], [cache["hook_embed"]]
    if "hook_pos_embed" in cache:
        labels, layers, parts = labels + ["pos_embed"], layers + [-1], parts + [cache["hook_pos_embed"]]
    for layer in range(hooked.cfg.n_layers):
        attn = hooked.blocks[layer].attn
        z = cache[f"blocks.{layer}.attn.hook_z"].double()  # (batch, pos, head, d_head)
        heads = torch.einsum("bphd,hdm->hbpm", z, attn.W_O.detach().double())
        for h in range(hooked.cfg.n_heads):
            labels.append(f"L{layer}H{h}"), layers.append(layer), parts.append(heads[h])
        if attn.b_O is not None:  # TransformerLens' adapter leaves it None for bias-free attention (Qwen3, Gemma 3, OLMo 2)
            labels.append(f"L{layer}.b_O"), layers.append(layer), parts.append(attn.b_O.detach().double().expand_as(parts[0]))
        labels.append(f"L{layer}.mlp"), layers.append(layer), parts.append(cache[f"blocks.{layer}.hook_mlp_out"])
    return labels, layers, torch.stack([p.double() for p in parts])


def frozen_attribution(hooked, cache):
    """(DLA: component (..., batch, pos, d_model) -> logits contribution, constant logits term), float64.

    With a final norm the cached `ln_final.hook_scale` (batch, pos, 1) is frozen; without one the map is exact.
    """
    norm = final_norm_params(hooked)
    w_u, b_u = hooked.W_U.detach().double(), hooked.b_U.detach().double()
    if norm is None:
        return (lambda c: c @ w_u), b_u
    scale = cache["ln_final.hook_scale"].double()
    w, b = (None if t is None else t.detach().double() for t in norm)
    rms = _is_rms(hooked)
    const = b_u if b is None else b @ w_u + b_u
    return (lambda c: ((c if rms else c - c.mean(-1, keepdim=True)) / scale * w) @ w_u), const


@torch.no_grad()
def dla_check(hooked, tokens: torch.Tensor) -> dict:
    """DLA errors (see module docstring) on `tokens` (batch, pos); per-layer errors under `per_layer`."""
    logits, cache = hooked.run_with_cache(tokens)
    logits = logits.double()
    labels, layers, stack = residual_components(hooked, cache)
    resid = cache[f"blocks.{hooked.cfg.n_layers - 1}.hook_resid_post"].double()
    f = final_map(hooked)
    full, f0 = f(resid), f(torch.zeros_like(resid[..., :1, :1, :]).expand_as(resid))
    frozen_of, frozen_const = frozen_attribution(hooked, cache)
    de_sum = torch.zeros_like(full)
    frozen_sum = frozen_const.expand_as(full).clone()
    n_layers = hooked.cfg.n_layers
    err_by_layer, de_by_layer = torch.zeros(n_layers + 1, dtype=torch.float64), torch.zeros(n_layers + 1, dtype=torch.float64)
    for c, layer in zip(stack, layers):
        de = full - f(resid - c)
        frozen = frozen_of(c)
        de_sum += de
        frozen_sum += frozen
        err_by_layer[layer + 1] += (frozen - de).norm()
        de_by_layer[layer + 1] += de.norm()
    logits_norm = logits.norm()
    return {
        "dla_relative_error": ((de_sum + f0 - logits).norm() / logits_norm).item(),
        "dla_frozen_scale_error": (err_by_layer.sum() / de_by_layer.sum()).item(),
        "dla_cached_scale_sum_error": ((frozen_sum - logits).norm() / logits_norm).item(),
        "residual_sum_error": ((stack.sum(0) - resid).norm() / resid.norm()).item(),
        "n_components": len(labels),
        "per_layer": {
            "layer": ["embed"] + list(range(n_layers)),
            "dla_frozen_scale_error": (err_by_layer / de_by_layer.clamp_min(1e-300)).tolist(),
        },
    }


@torch.no_grad()
def logit_agreement(hf_model, hooked, tokens: torch.Tensor) -> dict:
    """Max abs and relative (Frobenius) difference of HF and TransformerLens logits, fp32, on (batch, pos) tokens."""
    hf_logits = hf_model(tokens).logits.float()
    tl_logits = hooked(tokens).float()
    diff = hf_logits - tl_logits
    return {
        "hf_tl_max_abs_logit_diff": diff.abs().max().item(),
        "hf_tl_relative_logit_diff": (diff.norm() / hf_logits.norm()).item(),
        "max_abs_logit": hf_logits.abs().max().item(),
    }


@torch.no_grad()
def hf_scale_spread(hf_model, tokens: torch.Tensor) -> float:
    """Largest relative spread over tokens, (max - min) / mean, of the per-token divisor of any norm of the HF model
    (LayerNorm: sqrt(var + eps); RMSNorm: sqrt(mean(x^2) + eps)): ~var/(2 eps) ~ 1e-12 for an LN-free export,
    order 1 when the norm still normalizes."""
    from surgery.families import norm_eps, norm_kind
    from surgery.models.ln_free import norm_modules

    spreads = []

    def hook(module, args, out):
        x = args[0].double()
        second = x.pow(2).mean(-1) if norm_kind(module) == "rmsnorm" else x.var(-1, unbiased=False)
        scale = (second + norm_eps(module)).sqrt()
        spreads.append(((scale.max() - scale.min()) / scale.mean()).item())

    handles = [m.register_forward_hook(hook) for m in norm_modules(hf_model).values()]
    try:
        hf_model(tokens)
    finally:
        for h in handles:
            h.remove()
    return max(spreads, default=0.0)


@torch.no_grad()
def attention_sink_heads(hooked, tokens: torch.Tensor) -> torch.Tensor:
    """(n_layers, n_heads): mean attention that queries at positions >= 1 put on position 0, per head."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(hooked.cfg.n_layers)]
    _, cache = hooked.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n][:, :, 1:, 0].double().mean((0, 2)) for n in names])  # pattern: (batch, head, query, key)


def attention_sink_mass(heads: torch.Tensor) -> list[float]:
    """Per layer: mean share of attention that queries at positions >= 1 put on position 0 (all heads), from
    `attention_sink_heads`."""
    return heads.mean(1).tolist()


# What an LN-free export must satisfy (fp32): logits within 1e-4 of HF's, DLA exact to float error, and the HF
# model's per-token LN divisor constant to 1e-6 (the eps trick's own error is var / (2 eps) ~ 1e-9 for std 100).
LN_FREE_THRESHOLDS = {"hf_tl_max_abs_logit_diff": 1e-4, "dla_relative_error": 1e-5, "hf_scale_spread": 1e-6}


def ln_free_failures(result: dict) -> list[str]:
    """Which LN-free criteria a result of `logit_agreement`, `dla_check`, `hf_scale_spread`, has_normalization misses."""
    fails = [f"{k} = {result[k]:.3g} >= {v:g}" for k, v in LN_FREE_THRESHOLDS.items() if not result[k] < v]
    if result.get("has_normalization"):
        fails.append("has_normalization is true (a per-token scale remains)")
    return fails


def verify_ln_free(hf_model, tokens: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Test helper: load an LN-free HF model into TransformerLens and assert the LN-free criteria.

    `tokens` (batch, pos) default to 2 random sequences of min(32, context) tokens. Returns the numbers;
    raises AssertionError naming each failed criterion.
    """
    from surgery.lens import has_normalization, load_hooked

    if tokens is None:
        from surgery.models.ln_free import random_tokens

        tokens = random_tokens(hf_model, 2, 32, seed)
    hooked = load_hooked(hf_model)
    result = {"has_normalization": has_normalization(hooked), "hf_scale_spread": hf_scale_spread(hf_model, tokens)}
    result.update(logit_agreement(hf_model, hooked, tokens))
    result.update(dla_check(hooked, tokens))
    failures = ln_free_failures(result)
    if failures:
        raise AssertionError("LN-free checks failed: " + "; ".join(failures))
    return result
