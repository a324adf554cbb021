"""`load_hooked`: a Hugging Face model (directory or in memory) as a TransformerLens model, offline.

TransformerLens 4.x: a `TransformerBridge` around a TL-native model (`TransformerBridge.boot_native`), which
expresses LayerNorm / RMSNorm / no normalization, rotary embeddings, grouped-query attention and gated MLPs, but
- rotates adjacent feature pairs (2i, 2i+1), where GPT-NeoX and Llama rotate feature i with i + rotary_dim/2: the
  rotary columns of W_Q/W_K (and b_Q/b_K) are permuted to adjacent-pair order, the same permutation for queries
  and keys, so attention scores are unchanged; `hook_q`/`hook_k` list those features in that order;
- has no parallel attention/MLP block (its config accepts `parallel_attn_mlp` and ignores it): for GPT-NeoX with
  `use_parallel_residual` we build the same native model with parallel blocks and wrap it with the public
  `build_bridge_from_module`, using TransformerLens' own `ParallelBlockBridge` (no `hook_resid_mid`, as
  HookedTransformer had none for parallel blocks);
- its gated MLP has no biases: a Llama-style model with `mlp_bias` is refused;
- it has one rotary embedding for every layer: for Gemma 3, whose sliding-window and full-attention layers rotate
  with different bases, each layer's attention gets a rotary table of its own base (`layer_rotary_bases`).
Qwen3, Gemma 3 and OLMo 2 with their norms: TransformerLens' native blocks have no QK-norm and no post-sublayer
norm, so such a model is wrapped by TransformerLens' own adapter for its architecture
(`TransformerBridge.boot_transformers(..., hf_model=model)`, TransformerLens >= 4; it runs the HF modules and has
`hook_scale` at every norm, `attn.q_norm.hook_scale` included). Once LN-free, every norm folds and they convert
natively like the others.
TransformerLens 3.x: a `HookedTransformer` built from the same config (it has `parallel_attn_mlp` and rotate-half
rotary itself) by `surgery.lens.hooked`, weights loaded with a check that none is missing; its gated MLP has no
gate bias and adds b_in after the gate product, so a Llama-style model with gate or up biases is refused there too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from surgery.errors import SurgeryError
from surgery.lens.convert import has_inner_norms, lens_family, measured_ln_free, tl_parts
from surgery.lens.hooked import build_hooked_transformer, transformer_lens_major


def load_hf(path_or_model):
    """(HF model of a supported family in eval mode, tokenizer or None) from a directory or an in-memory model."""
    from transformers import PreTrainedModel

    tokenizer = None
    if isinstance(path_or_model, (str, Path)):
        from surgery.models.loading import load_causal_lm, load_tokenizer

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
    lens_family(model)  # SurgeryError naming the supported model types
    return model.eval(), tokenizer


def load_hooked(path_or_model, tokenizer=None, device: str | torch.device = "cpu", ln_free: bool | None = None):
    """A TransformerLens model for a GPT-2, GPT-NeoX, Llama-style, Qwen3, Gemma 3 or OLMo 2 directory or in-memory
    model, offline.

    LN-free model -> no normalization (no `hook_scale`); a model with norms -> `normalization_type` "LN" or "RMS"
    (Qwen3, Gemma 3, OLMo 2 with their norms: TransformerLens' own adapter around a copy of the model, which needs a
    tokenizer).
    `ln_free` defaults to `measured_ln_free(model)` (a partly converted model is refused with the names of the
    norms that still normalize); pass a decision already made to skip the measurement.
    With TransformerLens 4.x the result is a `TransformerBridge` (hook names as in HookedTransformer:
    `blocks.{l}.attn.hook_z` (batch, pos, head, d_head), `blocks.{l}.hook_resid_post` (batch, pos, d_model), ...);
    with 3.x a `HookedTransformer`. `tokenizer` defaults to the directory's own (None for an in-memory model).
    """
    hf_model, dir_tokenizer = load_hf(path_or_model)
    tokenizer = tokenizer if tokenizer is not None else dir_tokenizer
    ln_free = measured_ln_free(hf_model) if ln_free is None else ln_free
    if not ln_free and has_inner_norms(lens_family(hf_model)):
        return _load_adapter(hf_model, tokenizer, device)
    cfg, state = tl_parts(hf_model, ln_free)
    if transformer_lens_major() < 4:  # TransformerLens 3.x: HookedTransformer (4.x removed it)
        return build_hooked_transformer(cfg, state, tokenizer, device)
    return _load_bridge(cfg, state, tokenizer, device)


def adjacent_pair_order(d_head: int, rotary_dim: int) -> torch.Tensor:
    """Index over d_head putting rotate-half feature pairs (i, i + r/2) at adjacent positions (2i, 2i + 1)."""
    half = torch.arange(rotary_dim // 2)
    return torch.cat([torch.stack([half, half + rotary_dim // 2], dim=1).flatten(), torch.arange(rotary_dim, d_head)])


def native_state(cfg: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg, state) adapted to a TL-native model: rotary columns in adjacent-pair order, gated MLPs without biases."""
    cfg, state = dict(cfg), dict(state)
    if cfg["positional_embedding_type"] == "rotary":
        order = adjacent_pair_order(cfg["d_head"], cfg["rotary_dim"])
        for key in [k for k in state if k.endswith((".W_Q", ".W_K", ".b_Q", ".b_K"))]:
            state[key] = state[key][..., order].contiguous()
        cfg["rotary_adjacent_pairs"] = True
    if cfg["gated_mlp"]:
        for key in [k for k in state if k.endswith((".mlp.b_in", ".mlp.b_gate", ".mlp.b_out"))]:
            if state.pop(key).abs().max() > 0:
                raise SurgeryError(f"{key} is not zero, but TransformerLens 4.x's native gated MLP has no biases (mlp_bias)")
    return cfg, state


def _load_bridge(cfg: dict, state: dict, tokenizer, device):
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    cfg, state = native_state(cfg, state)
    layer_bases = cfg.pop("layer_rotary_bases", None)
    if cfg["parallel_attn_mlp"] or layer_bases:
        bridge = _boot_custom_native(cfg, tokenizer, device, layer_bases)
    else:
        bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device)
    bridge.load_state_dict(convert_tl_checkpoint(state, bridge.cfg), strict=True)
    return bridge.eval()


def _load_adapter(hf_model, tokenizer, device):
    """TransformerLens' own adapter around a copy of `hf_model` (a family with QK-norms or post-norms, norms kept),
    offline. A copy: the adapter replaces the model's modules by its bridges in place."""
    fam = lens_family(hf_model)
    if transformer_lens_major() < 4:
        raise SurgeryError(f"a {fam.name} model with its norms needs TransformerLens >= 4 (its {fam.hf_architecture} "
                           "adapter); TransformerLens 3.x has no QK-norm or post-sublayer norm. Upgrade transformer-lens")
    if tokenizer is None:
        raise SurgeryError(f"a {fam.name} model with its norms loads through TransformerLens' adapter, which needs a "
                           "tokenizer: pass tokenizer=..., or load the model from a directory holding one")
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = copy.deepcopy(hf_model)
    if not getattr(hf_model.config, "architectures", None):  # the adapter is chosen by architecture name
        hf_model.config.architectures = [fam.hf_architecture]
    bridge = TransformerBridge.boot_transformers(fam.hf_architecture, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device)
    return bridge.eval()


def _boot_custom_native(cfg: dict, tokenizer, device, layer_bases: list[float] | None):
    """`boot_native` with what its config cannot say: blocks where attention and MLP both read the block's input
    (out = x + attn + mlp) for `parallel_attn_mlp`, and a rotary base per layer (`layer_bases`: Gemma 3's sliding
    and full-attention layers rotate with different bases)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.generalized_components import ParallelBlockBridge
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.model_bridge.sources.native import NativeBlock, NativeModel
    from transformer_lens.model_bridge.sources.native.model import NativeRotary

    class ParallelNativeBlock(NativeBlock):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
            attn_out, _ = self.attn(self.ln1(hidden_states), attention_mask=attention_mask, position_ids=position_ids)
            return (hidden_states + attn_out + self.mlp(self.ln2(hidden_states)),)

    tl_cfg = TransformerBridgeConfig.from_dict(cfg)
    model = NativeModel(tl_cfg)
    if cfg["parallel_attn_mlp"]:
        for i in range(len(model.layers)):
            model.layers[i] = ParallelNativeBlock(tl_cfg, rotary=model.rotary)
    rotaries = {}
    for layer, base in enumerate(layer_bases or []):
        if base not in rotaries:
            rotaries[base] = NativeRotary(TransformerBridgeConfig.from_dict({**cfg, "rotary_base": base}))
        model.layers[layer].attn.rotary = rotaries[base]
    model = model.to(device)

    def parallel_blocks(adapter) -> None:
        sequential = adapter.component_mapping["blocks"]
        adapter.component_mapping["blocks"] = ParallelBlockBridge(sequential.name, config=adapter.cfg, submodules=sequential.submodules)

    return build_bridge_from_module(model, "TransformerLensNative", tl_config=tl_cfg, tokenizer=tokenizer, device=device,
                                    model_name="native", post_adapter_hook=parallel_blocks if cfg["parallel_attn_mlp"] else None)


def has_normalization(hooked) -> bool:
    """Whether any per-token scale remains: a `hook_scale` or `hook_normalized` hook point in the model."""
    return any(name.endswith(("hook_scale", "hook_normalized")) for name in hooked.hook_dict)
