"""Hugging Face model -> TransformerLens config and weights, for every family of `surgery.families`.

One conversion reads the family description (module paths, Q/K/V layout, norm kind, parallel residual, config
fields, transformers class) instead of hard-coding a model's attributes, so GPT-2, GPT-NeoX (Pythia) and
Llama-style models (llama, qwen2, mistral) share it:

- an LN-free model (every norm neutralised by a huge eps, so it computes the affine map `c(x) * w / sqrt(eps) + b`;
  detected from the weights by `surgery.models.ln_free.detect_ln_free`, not from a config key) becomes a model with **no
  normalization at all** (`normalization_type=None`: no `hook_scale`, no `hook_normalized`). Each norm is folded
  exactly into the weights that read it: a LayerNorm's centering `C = I - 11^T/d`, gain `w/sqrt(eps)` and bias
  into W_Q/W_K/W_V and b_Q/b_K/b_V, W_in (and W_gate) and b_in; an RMSNorm's gain alone (it neither centers nor
  has a bias). The final norm is folded into an untied W_U and b_U, so `logits = resid_final @ W_U + b_U` and
  direct logit attribution is exact.
- a model with norms keeps them: `normalization_type` "LN" (LayerNorm families) or "RMS" (RMSNorm), weights copied.
  (Families with QK-norms or post-sublayer norms, Qwen3, Gemma 3 and OLMo 2, have norms TransformerLens' native
  blocks cannot hold; `surgery.lens.load` wraps such a model with norms in TransformerLens' own adapter instead.)

The norms beyond pre-norms fold the same way once neutralised (`surgery.families.Family.block_norms`): a QK-norm's
gain into W_Q / W_K and b_Q / b_K (each head's features by the shared d_head gain, or the whole projection's by its
own), a post-sublayer norm's into W_O and b_O / W_out and b_out; Gemma's `(1 + weight)` gain is read as such, its
sqrt(d) embedding scale is folded into W_E and its `query_pre_attn_scalar` becomes `attn_scale`.

Weights come out in TransformerLens' property format (`blocks.0.attn.W_Q` (n_heads, d_model, d_head), ...), with
rotary features in Hugging Face's rotate-half order (feature i pairs with i + rotary_dim/2, as TransformerLens
3.x's `rotary_adjacent_pairs=False`); `surgery.lens.load` adapts them to the TransformerLens version installed.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery import families
from surgery.families import FAMILIES, Family, blocks, family_of, get_module, in_out_weight

# HF activation name -> TransformerLens act_fn (HF "gelu" is the exact erf GELU, as TransformerLens' "gelu")
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def lens_family(model_or_config) -> Family:
    """The family of a model the lens converts: one whose models transformers' own class builds (SurgeryError for
    other families: XATL hybrids, whose blocks are not all attention + MLP; shared-depth twins, whose layers read
    one block's weights: convert their vanilla expansion, `surgery.share.expand`)."""
    fam = family_of(model_or_config)
    if not fam.is_source:
        supported = [f.name for f in FAMILIES.values() if f.is_source]
        why = ("its blocks are not all attention + MLP" if fam.hybrid else
               "its layers share weights; convert its vanilla expansion, surgery.share.expand(model)")
        raise SurgeryError(f"TransformerLens conversion supports the {', '.join(supported)} families, not {fam.name} "
                           f"({why})")
    return fam


def lens_supports(model_type: str | None) -> bool:
    """Whether models of this `model_type` convert to TransformerLens (a family the lens knows, not a hybrid)."""
    from types import SimpleNamespace

    try:
        lens_family(SimpleNamespace(model_type=model_type))
    except SurgeryError:
        return False
    return True


def tl_parts(hf_model, ln_free: bool | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(`tl_config` dict, `tl_state_dict` weights) of `hf_model`; `ln_free` defaults to `measured_ln_free`,
    and a model with norms keeps its own eps."""
    ln_free = measured_ln_free(hf_model) if ln_free is None else ln_free
    return tl_config(hf_model.config, ln_free, None if ln_free else norm_eps(hf_model)), tl_state_dict(hf_model, ln_free)


def measured_ln_free(model, tokens: torch.Tensor | None = None) -> bool:
    """True when every norm of `model` is neutralised, measured from its weights and activations
    (`surgery.models.ln_free.detect_ln_free`; `config.surgery_ln_free` is not read: see
    `surgery.remove_ln.export.marked_ln_free` for that); SurgeryError naming the norms that still normalize when only
    some are."""
    from surgery.models.ln_free import detect_ln_free

    if not isinstance(model, nn.Module):
        raise TypeError(f"measured_ln_free measures a model's norms; it takes a model, not a {type(model).__name__}")
    return detect_ln_free(model, tokens)


def module_eps(norm: nn.Module) -> float:
    """A norm module's epsilon (`surgery.families.norm_eps`); SurgeryError for a module without one."""
    eps = families.norm_eps(norm)
    if eps is None:
        raise SurgeryError(f"cannot read the epsilon of a {type(norm).__name__}")
    return eps


def _norms(model, fam: Family) -> list[nn.Module]:
    return [get_module(b, p) for b in blocks(model) for p in fam.block_norms().values()] + [get_module(model, fam.final_norm)]


def has_inner_norms(fam: Family) -> bool:
    """Whether the family normalizes inside attention or on sublayer outputs (QK-norms, post-norms): norms that
    TransformerLens' native blocks have no place for (only an LN-free model of such a family converts natively)."""
    return bool(set(fam.block_norms()) - {"attn_in", "mlp_in"})


def norm_eps(model) -> float:
    """The one epsilon of a model's norms, read from the modules (TransformerLens has a single `eps`; reading it from
    an official config instead of the model is how LN-free models go wrong)."""
    eps = {module_eps(n) for n in _norms(model, family_of(model))}
    if len(eps) != 1:
        raise SurgeryError(f"the norms of this model use different epsilons {sorted(eps)}; TransformerLens has one eps")
    return eps.pop()


def _act_fn(config, fam: Family) -> str:
    name = fam.activation(config)
    if name not in ACTIVATIONS:
        raise SurgeryError(f"activation {name!r} is not supported by the lens conversion (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _rope(config, fam: Family, d_head: int) -> tuple[int, float]:
    """(rotary_dim, rotary_base) of a rotary family's config (`Family.rotary`; Gemma 3's full-attention layers)."""
    rotary = fam.rotary(config)
    if rotary.kind != "default":
        raise SurgeryError(f"rope type {rotary.kind!r} is not supported by the lens conversion (only the default rotary embedding)")
    return int(d_head * rotary.fraction), rotary.base


def layer_rotary_bases(config) -> list[float] | None:
    """The rotary base of each layer where the config sets them by layer type (Gemma 3: `rope_parameters` by layer
    type, `layer_types` naming each layer's), else None."""
    by_type = getattr(config, "rope_parameters", None) or {}
    types = getattr(config, "layer_types", None)
    if not types or not all(t in by_type for t in set(types)):
        return None
    for t in set(types):
        kind = by_type[t].get("rope_type", "default")
        if kind != "default":
            raise SurgeryError(f"rope type {kind!r} ({t} layers) is not supported by the lens conversion "
                               "(only the default rotary embedding)")
    return [float(by_type[t]["rope_theta"]) for t in types]


def _check_supported(config, fam: Family) -> None:
    caps = fam.softcaps(config)
    if caps:
        raise SurgeryError(f"{fam.name} soft caps {caps} put a tanh on attention scores or logits, which the lens "
                           "conversion does not carry (direct logit attribution would not be exact); set them to None")
    if not fam.standard_attn_scale(config):
        flags = ", ".join(f"{key}={getattr(config, key, keep)}" for key, keep in fam.attn_scale_flags)
        raise SurgeryError(f"{fam.name} attention scaling other than 1/sqrt(d_head) ({flags}) is not supported by the "
                           "lens conversion")
    _act_fn(config, fam)


def tl_config(config, ln_free: bool, eps: float | None = None) -> dict:
    """A TransformerLens config dict for a Hugging Face `config` of a supported family; `eps` (default: the config's
    own, `family.eps_key`) is the norm epsilon of a model with norms (unused without normalization)."""
    fam = lens_family(config)
    _check_supported(config, fam)
    d, n_heads = config.hidden_size, config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or d // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    n_ctx = fam.attention_span(config)  # the context, or a sliding window within it
    d_mlp = fam.mlp_width(config)
    cfg = {
        "n_layers": config.num_hidden_layers,
        "d_model": d,
        "n_heads": n_heads,
        "d_head": d_head,
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "d_mlp": d_mlp,
        "d_vocab": config.vocab_size,
        "d_vocab_out": config.vocab_size,
        "n_ctx": n_ctx,
        "act_fn": _act_fn(config, fam),
        "gated_mlp": len(fam.mlp_in) == 2,
        "parallel_attn_mlp": fam.parallel_residual(config),
        "normalization_type": None if ln_free else ("RMS" if fam.norm_kind == "rmsnorm" else "LN"),
        "final_rms": fam.norm_kind == "rmsnorm" and not ln_free,
        "eps": 1e-5 if ln_free else (getattr(config, fam.eps_key) if eps is None else eps),
        "positional_embedding_type": "standard" if fam.pos_emb else "rotary",
        "original_architecture": fam.hf_architecture,
        "default_prepend_bos": False,
        "tokenizer_prepends_bos": False,
        "init_weights": False,
    }
    if fam.query_scale_key:  # scores scaled by query_pre_attn_scalar**-0.5; TransformerLens divides by attn_scale
        cfg["attn_scale"] = float(getattr(config, fam.query_scale_key)) ** 0.5
    if not fam.pos_emb:
        cfg["rotary_dim"], cfg["rotary_base"] = _rope(config, fam, d_head)
        cfg["rotary_adjacent_pairs"] = False  # HF's rotate-half: feature i rotates with i + rotary_dim / 2
        bases = layer_rotary_bases(config)
        if bases:
            cfg["rotary_base"] = bases[0]
        if bases and len(set(bases)) > 1:  # not a TransformerLens field: `surgery.lens.load` builds these rotaries
            cfg["layer_rotary_bases"] = bases
    return cfg


def norm_gain(norm: nn.Module, offset: float = 0.0) -> torch.Tensor:
    """g = (offset + w) / sqrt(eps) (d,), float64: what a neutralised norm multiplies its input by."""
    return (norm.weight.double() + offset) / module_eps(norm) ** 0.5


def fold_norm(norm: nn.Module, kind: str, weight: torch.Tensor, bias: torch.Tensor, offset: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a neutralised norm into the affine map `x @ weight + bias` that reads it, in float64.

    The norm computes `c(x) * g + b` with g = (offset + w) / sqrt(eps) (its input's second moment << eps) and c the
    centering of a LayerNorm (the identity for an RMSNorm, which has no b). `weight` is (d_model, ...) in `x @ weight`
    orientation, `bias` (...). Returns (C diag(g) weight, bias + b @ weight); C is left out for an RMSNorm.
    """
    w = weight.double()
    folded = torch.einsum("d,d...->d...", norm_gain(norm, offset), w)
    if kind == "layernorm":
        folded = folded - folded.mean(dim=0, keepdim=True)  # C @ M: subtract the mean over the input dimension
    norm_bias = getattr(norm, "bias", None)
    shift = torch.einsum("d,d...->...", norm_bias.double(), w) if norm_bias is not None else 0.0
    return folded, bias.double() + shift


def _affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (in, out), bias (out,)) of a projection; a zero bias where it has none."""
    w = in_out_weight(module)
    b = getattr(module, "bias", None)
    return w, (b if b is not None else torch.zeros(w.shape[1], dtype=w.dtype, device=w.device))


def _qkv(block: nn.Module, fam: Family, cfg: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"Q"|"K"|"V": (W (d_model, heads, d_head), b (heads, d_head))}; K and V have n_key_value_heads heads."""
    d, h, dh = cfg["d_model"], cfg["n_heads"], cfg["d_head"]
    if fam.qkv_layout == "separate":
        out = {}
        for name, path in zip("QKV", fam.qkv):
            w, b = _affine(get_module(block, path))
            out[name] = (w.reshape(d, -1, dh), b.reshape(-1, dh))
        return out
    w, b = _affine(get_module(block, fam.qkv[0]))  # (d, 3 * h * dh)
    if fam.qkv_layout == "fused":  # [q | k | v]
        w, b = w.reshape(d, 3, h, dh), b.reshape(3, h, dh)
        return {name: (w[:, i], b[i]) for i, name in enumerate("QKV")}
    w, b = w.reshape(d, h, 3, dh), b.reshape(h, 3, dh)  # fused_per_head: per head [q, k, v]
    return {name: (w[:, :, i], b[:, i]) for i, name in enumerate("QKV")}


def tl_state_dict(model, ln_free: bool | None = None) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model in TransformerLens property format, float32.

    LN-free models (`ln_free`, default: `measured_ln_free`) have every norm folded in (module docstring);
    other models keep `ln1.w` (and `ln1.b` for LayerNorm), ... Gated MLPs: `W_gate` (gate_proj) and `W_in` (up_proj).
    """
    fam = family_of(model)
    ln_free = measured_ln_free(model) if ln_free is None else ln_free
    if not ln_free and has_inner_norms(fam):
        raise SurgeryError(f"{fam.name} normalizes queries/keys or sublayer outputs, which TransformerLens' native "
                           "blocks cannot hold; load it with surgery.lens.load_hooked (TransformerLens' own adapter)")
    cfg = tl_config(model.config, ln_free=True)  # shapes only
    h, dh = cfg["n_heads"], cfg["d_head"]
    offset = fam.norm_gain_offset

    def read(role: str, block, weight: torch.Tensor, bias: torch.Tensor):
        path = fam.block_norms().get(role)
        if not ln_free or path is None:
            return weight, bias
        return fold_norm(get_module(block, path), fam.norm_kind, weight, bias, offset)

    def after(role: str, block, weight: torch.Tensor, bias: torch.Tensor, heads: int | None = None):
        """Fold a neutralised norm on the output of `x @ weight + bias` (output features last)."""
        path = fam.block_norms().get(role)
        if path is None:
            return weight, bias
        g = norm_gain(get_module(block, path), offset)
        if heads is not None and fam.qk_norm == "whole":
            g = g.reshape(heads, dh)
        return weight.double() * g, bias.double() * g

    emb = model.get_input_embeddings().weight  # HF's own accessors: head names move between versions
    sd = {"embed.W_E": emb.double() * fam.embed_scale(model.config)}
    if fam.pos_emb:
        sd["pos_embed.W_pos"] = get_module(model, fam.pos_emb).weight
    for i, block in enumerate(blocks(model)):
        p = f"blocks.{i}"
        for name, (w, b) in _qkv(block, fam, cfg).items():
            w, b = read("attn_in", block, w, b)
            if name in "QK" and ln_free:
                w, b = after(name.lower(), block, w, b, heads=w.shape[1])
            sd[f"{p}.attn.W_{name}"], sd[f"{p}.attn.b_{name}"] = w.permute(1, 0, 2), b
        w_o, b_o = after("attn_out", block, *_affine(get_module(block, fam.attn_out)))
        sd[f"{p}.attn.W_O"], sd[f"{p}.attn.b_O"] = w_o.reshape(h, dh, -1), b_o
        for name, path in zip(("in",) if len(fam.mlp_in) == 1 else ("gate", "in"), fam.mlp_in):
            sd[f"{p}.mlp.W_{name}"], sd[f"{p}.mlp.b_{name}"] = read("mlp_in", block, *_affine(get_module(block, path)))
        sd[f"{p}.mlp.W_out"], sd[f"{p}.mlp.b_out"] = after("mlp_out", block, *_affine(get_module(block, fam.mlp_out)))
        if not ln_free:
            for key, role in (("ln1", "attn_in"), ("ln2", "mlp_in")):
                sd.update(_norm_params(f"{p}.{key}", get_module(block, fam.block_norms()[role])))
    w_u, b_u = _affine(model.get_output_embeddings())  # (d, vocab); a tied head is copied, so W_U is untied
    final = get_module(model, fam.final_norm)
    if ln_free:
        w_u, b_u = fold_norm(final, fam.norm_kind, w_u, b_u, offset)
    else:
        sd.update(_norm_params("ln_final", final))
    sd["unembed.W_U"], sd["unembed.b_U"] = w_u, b_u
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def _norm_params(prefix: str, norm: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.w": norm.weight}
    if getattr(norm, "bias", None) is not None:
        out[f"{prefix}.b"] = norm.bias
    return out
