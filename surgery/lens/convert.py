"""Load GPT-2 models, with or without LayerNorm, into TransformerLens, offline.

`load_hooked(path_or_model)` converts a Hugging Face GPT-2 into a TransformerLens model:

- an LN-free model (every LayerNorm neutralised by a huge eps, so it computes `(x - mean) * w / sqrt(eps) + b`:
  our export, Baroni et al.'s and Heimersheim's published formats; detected from the weights by
  `surgery.ln_free.scan_norms`, not from a config key) becomes a model with **no normalization at all**
  (`normalization_type=None`: no `hook_scale`, no `hook_normalized`). Each LN is folded exactly into
  the weights that read it: the centering `C = I - 11^T/d` and the gain `w/sqrt(eps)` into W_Q/W_K/W_V,
  W_in and an untied W_U; the LN bias into b_Q/b_K/b_V, b_in and b_U. The residual-to-logits map is
  then affine, `logits = resid_final @ W_U + b_U`, so direct logit attribution is exact.
- a model with LayerNorms becomes the usual TransformerLens model with `normalization_type="LN"`
  (weights copied, no folding), which keeps `hook_scale` at every norm.

The weights are first written in TransformerLens' property format (`blocks.0.attn.W_Q`, shape
(n_heads, d_model, d_head), ...), then loaded into a TransformerLens 4.x `TransformerBridge` built by
`boot_native` (no Hub call), or, with TransformerLens 3.x, into a `HookedTransformer`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from surgery.errors import SurgeryError

# HF activation name -> TransformerLens act_fn
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def is_ln_free(model, tokens: torch.Tensor | None = None) -> bool:
    """True when every norm of `model` is neutralised (measured: `surgery.ln_free.detect_ln_free`); SurgeryError
    naming the norms that still normalize when only some are."""
    from surgery.ln_free import detect_ln_free

    if not isinstance(model, nn.Module):
        raise TypeError(f"is_ln_free measures a model's norms; it takes a model, not a {type(model).__name__}")
    return detect_ln_free(model, tokens)


def load_hf(path_or_model):
    """(HF GPT-2 model in eval mode, tokenizer or None) from a directory or an in-memory model."""
    from transformers import PreTrainedModel

    tokenizer = None
    if isinstance(path_or_model, (str, Path)):
        from surgery.loading import load_causal_lm, load_tokenizer

        path = Path(path_or_model).expanduser()
        if not path.exists():
            raise SurgeryError(f"model directory {str(path_or_model)!r} does not exist")
        if not path.is_dir() or not (path / "config.json").exists():
            raise SurgeryError(f"{str(path_or_model)!r} is not a model directory (no config.json written by save_pretrained)")
        model = load_causal_lm(str(path))
        if (path / "tokenizer.json").exists():
            tokenizer = load_tokenizer(str(path))
    elif isinstance(path_or_model, PreTrainedModel):
        model = path_or_model
    else:
        raise SurgeryError(f"load_hooked takes a model directory or a transformers model, not a {type(path_or_model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type != "gpt2":
        raise SurgeryError(f"TransformerLens conversion supports GPT-2 models only; this model is of type {model_type!r}")
    return model.eval(), tokenizer


def _check_supported(config) -> None:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
        raise SurgeryError("GPT-2 attention scaling other than 1/sqrt(d_head) is not supported by the lens conversion")
    if config.activation_function not in _ACTIVATIONS:
        raise SurgeryError(f"activation {config.activation_function!r} is not supported (known: {', '.join(_ACTIVATIONS)})")


def norm_eps(model) -> float:
    """The one epsilon of a GPT-2's LayerNorms, read from the modules (TransformerLens has a single `eps`; reading
    it from an official config instead of the model is how LN-free models go wrong)."""
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise SurgeryError(f"the LayerNorms of this model use different epsilons {sorted(eps)}; TransformerLens has one eps")
    return eps.pop()


def tl_config(config, ln_free: bool, eps: float | None = None) -> dict:
    """A TransformerLens config dict for a GPT-2 `config`; `eps` (default config.layer_norm_epsilon) is the
    LayerNorm epsilon of a model with LN (unused without normalization)."""
    d = config.n_embd
    return {
        "n_layers": config.n_layer,
        "d_model": d,
        "n_heads": config.n_head,
        "d_head": d // config.n_head,
        "d_mlp": config.n_inner or 4 * d,
        "d_vocab": config.vocab_size,
        "d_vocab_out": config.vocab_size,
        "n_ctx": config.n_positions,
        "act_fn": _ACTIVATIONS[config.activation_function],
        "normalization_type": None if ln_free else "LN",
        "eps": 1e-5 if ln_free else (config.layer_norm_epsilon if eps is None else eps),
        "positional_embedding_type": "standard",
        "original_architecture": "GPT2LMHeadModel",
        "default_prepend_bos": False,
        "tokenizer_prepends_bos": False,
        "init_weights": False,
    }


def _fold_norm(ln: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a neutralised LayerNorm into the affine map `x @ weight + bias` that reads it.

    The LN computes `(x - mean(x)) * g + b` with g = w / sqrt(eps) (var << eps); `weight` is
    (d_model, d_out) in `x @ weight` orientation. Returns (C diag(g) weight, bias + b @ weight), in float64.
    """
    gain = ln.weight.double() / ln.eps**0.5
    folded = gain[:, None] * weight.double()
    folded = folded - folded.mean(dim=0, keepdim=True)  # C @ M: subtract the mean over the input dimension
    return folded, bias.double() + ln.bias.double() @ weight.double()


def tl_state_dict(model, ln_free: bool | None = None) -> dict[str, torch.Tensor]:
    """The weights of an HF GPT-2 in TransformerLens property format (`embed.W_E`, `blocks.0.attn.W_Q`, ...).

    LN-free models (`ln_free`, default: measured by `is_ln_free`) have their LayerNorms folded in (see module
    docstring); other models keep `ln*.w/b`.
    """
    cfg = model.config
    ln_free = is_ln_free(model) if ln_free is None else ln_free
    d, n_heads = cfg.n_embd, cfg.n_head
    d_head = d // n_heads
    tr = model.transformer
    sd = {"embed.W_E": tr.wte.weight, "pos_embed.W_pos": tr.wpe.weight}

    def read(ln: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor):
        return _fold_norm(ln, weight, bias) if ln_free else (weight, bias)

    for i, block in enumerate(tr.h):
        p = f"blocks.{i}"
        w_qkv, b_qkv = read(block.ln_1, block.attn.c_attn.weight, block.attn.c_attn.bias)  # (d, 3d), (3d,)
        for name, w, b in zip("QKV", w_qkv.split(d, dim=1), b_qkv.split(d)):
            sd[f"{p}.attn.W_{name}"] = w.reshape(d, n_heads, d_head).permute(1, 0, 2)
            sd[f"{p}.attn.b_{name}"] = b.reshape(n_heads, d_head)
        sd[f"{p}.attn.W_O"] = block.attn.c_proj.weight.reshape(n_heads, d_head, d)
        sd[f"{p}.attn.b_O"] = block.attn.c_proj.bias
        sd[f"{p}.mlp.W_in"], sd[f"{p}.mlp.b_in"] = read(block.ln_2, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        sd[f"{p}.mlp.W_out"], sd[f"{p}.mlp.b_out"] = block.mlp.c_proj.weight, block.mlp.c_proj.bias
        if not ln_free:
            sd[f"{p}.ln1.w"], sd[f"{p}.ln1.b"] = block.ln_1.weight, block.ln_1.bias
            sd[f"{p}.ln2.w"], sd[f"{p}.ln2.b"] = block.ln_2.weight, block.ln_2.bias
    w_u = model.get_output_embeddings().weight.T  # (d, vocab)
    b_u = torch.zeros(w_u.shape[1], dtype=w_u.dtype)
    head_bias = getattr(model.get_output_embeddings(), "bias", None)
    if head_bias is not None:
        b_u = head_bias
    if ln_free:
        sd["unembed.W_U"], sd["unembed.b_U"] = _fold_norm(tr.ln_f, w_u, b_u)
    else:
        sd["ln_final.w"], sd["ln_final.b"] = tr.ln_f.weight, tr.ln_f.bias
        sd["unembed.W_U"], sd["unembed.b_U"] = w_u, b_u
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def transformer_lens_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformer_lens")


def _major_version() -> int:
    import transformer_lens

    version = getattr(transformer_lens, "__version__", None) or transformer_lens_version()
    return int(version.split(".")[0])


def load_hooked(path_or_model, tokenizer=None, device: str | torch.device = "cpu", ln_free: bool | None = None):
    """A TransformerLens model for a GPT-2 directory or in-memory `transformers` GPT-2, offline.

    LN-free model -> no normalization (no `hook_scale`); a model with LayerNorms -> `normalization_type="LN"`.
    `ln_free` defaults to `is_ln_free(model)` (measured; a partly converted model is refused with the names
    of the norms that still normalize); pass a decision already made to skip the measurement.
    With TransformerLens 4.x the result is a `TransformerBridge` (hook names as in HookedTransformer:
    `blocks.{l}.attn.hook_z` (batch, pos, head, d_head), `blocks.{l}.hook_resid_post` (batch, pos, d_model), ...);
    with 3.x a `HookedTransformer`. `tokenizer` defaults to the directory's own (None for an in-memory model).
    """
    hf_model, dir_tokenizer = load_hf(path_or_model)
    _check_supported(hf_model.config)
    tokenizer = tokenizer if tokenizer is not None else dir_tokenizer
    ln_free = is_ln_free(hf_model) if ln_free is None else ln_free
    cfg = tl_config(hf_model.config, ln_free, None if ln_free else norm_eps(hf_model))
    state = tl_state_dict(hf_model, ln_free)
    if _major_version() < 4:  # TransformerLens 3.x: HookedTransformer (4.x removed it)
        return _load_hooked_transformer(cfg, state, tokenizer, device)
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device)
    bridge.load_state_dict(convert_tl_checkpoint(state, bridge.cfg), strict=True)
    return bridge.eval()


def _load_hooked_transformer(cfg: dict, state: dict, tokenizer, device):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    keys = set(HookedTransformerConfig.__dataclass_fields__)
    ht_cfg = HookedTransformerConfig(**{k: v for k, v in cfg.items() if k in keys}, device=str(device))
    model = HookedTransformer(ht_cfg, tokenizer=tokenizer, move_to_device=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith((".mask", ".IGNORE"))]:
        raise SurgeryError(f"TransformerLens state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def has_normalization(hooked) -> bool:
    """Whether any per-token scale remains: a `hook_scale` or `hook_normalized` hook point in the model."""
    return any(name.endswith(("hook_scale", "hook_normalized")) for name in hooked.hook_dict)
