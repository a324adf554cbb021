"""A Hugging Face model as TransformerLens 3.x `HookedTransformer` parts: a `HookedTransformerConfig` and a state dict.

For users who build their own `HookedTransformer` (TransformerLens 3.x; 4.0 removed it, and `load_hooked` returns a
`TransformerBridge` there). An LN-free model comes out with `normalization_type=None` and every norm folded into
the weights that read it (`surgery.lens.convert`), so the model has no `hook_scale`:

    cfg, state = hooked_config_and_weights(hf_model)
    model = HookedTransformer(cfg)
    model.load_state_dict(state, strict=False)  # missing: only buffers the model builds (mask, IGNORE, rotary_sin/cos)

HookedTransformer keeps HF's rotate-half rotary order itself (`rotary_adjacent_pairs=False`) and has parallel
attention/MLP blocks (`parallel_attn_mlp`), so every family converts unchanged, with two adaptations:
- grouped-query attention stores K/V with n_key_value_heads heads as `_W_K`, `_b_K`, `_W_V`, `_b_V`;
- its gated MLP is `(act(x @ W_gate) * (x @ W_in) + b_in) @ W_out + b_out`: no gate bias, and `b_in` is added after
  the product, so it is not HF's `up_proj` bias. A Llama-style model with non-zero gate or up biases (`mlp_bias`)
  is refused; its down bias is `b_out`.
"""

from __future__ import annotations

import torch

from surgery.errors import SurgeryError
from surgery.lens.convert import lens_family, tl_parts

BUFFERS = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")  # built by HookedTransformer from its config


def transformer_lens_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformer_lens")


def transformer_lens_major() -> int:
    """The major version of the installed TransformerLens."""
    return int(transformer_lens_version().split(".")[0])


def hooked_state(cfg: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tl_state_dict` weights in the layout of a 3.x `HookedTransformer` built from `cfg` (a `tl_config` dict)."""
    state = dict(state)
    if cfg["gated_mlp"]:
        for key in [k for k in state if k.endswith((".mlp.b_gate", ".mlp.b_in"))]:
            if state[key].abs().max() > 0:
                raise SurgeryError(f"{key} is not zero, but TransformerLens 3.x's gated MLP has no gate bias and adds "
                                   "b_in after the gate product (an HF mlp_bias model has no HookedTransformer form)")
            if key.endswith(".b_gate"):
                del state[key]
    if cfg["n_key_value_heads"]:  # K/V kept with n_key_value_heads heads (W_K, W_V expand them on reading)
        renames = {".attn.W_K": ".attn._W_K", ".attn.W_V": ".attn._W_V", ".attn.b_K": ".attn._b_K", ".attn.b_V": ".attn._b_V"}
        for old, new in renames.items():
            for key in [k for k in state if k.endswith(old)]:
                state[key[: -len(old)] + new] = state.pop(key)
    return state


def hooked_transformer_config(cfg: dict, device: str | torch.device = "cpu"):
    """A `HookedTransformerConfig` from a `tl_config` dict; SurgeryError if this TransformerLens lacks a field."""
    if "layer_rotary_bases" in cfg:
        raise SurgeryError("this model's layers rotate with different bases (Gemma 3's sliding and full-attention "
                           "layers); HookedTransformer has one rotary base: load it with TransformerLens 4 "
                           "(surgery.lens.load_hooked)")
    from transformer_lens import HookedTransformerConfig

    unknown = sorted(set(cfg) - set(HookedTransformerConfig.__dataclass_fields__))
    if unknown:
        raise SurgeryError(f"this TransformerLens's HookedTransformerConfig has no {', '.join(unknown)}; "
                           "use TransformerLens 3.9 or later")
    return HookedTransformerConfig(**cfg, device=str(device))


def hooked_config_and_weights(hf_model, ln_free: bool | None = None, device: str | torch.device = "cpu"):
    """(HookedTransformerConfig, state dict) of a GPT-2, GPT-NeoX or Llama-style HF model, for TransformerLens 3.x.

    `ln_free` defaults to `measured_ln_free(hf_model)`: an LN-free model gets `normalization_type=None` and its
    norms folded into W_Q/W_K/W_V, W_in/W_gate and an untied W_U; a model with norms keeps "LN" / "RMS" and its own
    eps. Weights are float32 tensors keyed as HookedTransformer's parameters (`blocks.0.attn.W_Q` (n_heads,
    d_model, d_head), ...); load them with `load_state_dict(state, strict=False)`: the keys it reports missing are
    only the buffers the model builds from its config (`mask`, `IGNORE`, `rotary_sin`, `rotary_cos`).
    """
    major = transformer_lens_major()
    if major >= 4:
        raise SurgeryError(f"HookedTransformer was removed in TransformerLens 4.0 (installed: {major}.x); install "
                           "transformer_lens>=3.9,<4 for it, or use surgery.lens.load_hooked (a TransformerBridge)")
    lens_family(hf_model)  # SurgeryError naming the supported families
    cfg, state = tl_parts(hf_model, ln_free)
    return hooked_transformer_config(cfg, device), hooked_state(cfg, state)


def build_hooked_transformer(cfg: dict, state: dict[str, torch.Tensor], tokenizer=None, device="cpu"):
    """A 3.x `HookedTransformer` from a `tl_config` dict and `tl_state_dict` weights; SurgeryError naming any weight
    it does not take or lacks."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(hooked_transformer_config(cfg, device), tokenizer=tokenizer, move_to_device=True)
    missing, unexpected = model.load_state_dict(hooked_state(cfg, state), strict=False)
    missing = [k for k in missing if not k.endswith(BUFFERS)]
    if unexpected or missing:
        raise SurgeryError(f"TransformerLens state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
