"""`surgery.families` against the modules and configs transformers builds: every norm a family describes is found,
of the family's kind, with the config's epsilon; context length, MLP width, activation and rotary settings read the
config values; the name under which a decoder layer hands its attention the cache is the one transformers' layer
and attention classes take (so a transformers upgrade that renames it fails here, not in a hybrid's generation)."""

from __future__ import annotations

import subprocess
import sys

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, Qwen2Config)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from surgery.families import (FAMILIES, GPT2, GPT_NEOX, LLAMA, Rotary, blocks, context_length_of, family_of, get_module,
                              is_norm, norm_eps, norm_kind, norm_paths, set_norm_eps)

# Distinct, non-default values, so that reading the wrong field shows.
CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=48, n_inner=80,
                               layer_norm_epsilon=1e-4, activation_function="gelu_new"),
    "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=72,
                                      vocab_size=64, max_position_embeddings=40, rotary_pct=0.25, layer_norm_eps=2e-5,
                                      hidden_act="gelu", tie_word_embeddings=False),
    "llama": lambda: LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=48, vocab_size=64, max_position_embeddings=56, rms_norm_eps=3e-6,
                                 hidden_act="silu"),
}
# (context field, its value, MLP width, activation) of each config above
EXPECTED = {"gpt2": (48, 80, "gelu_new"), "gpt_neox": (40, 72, "gelu"), "llama": (56, 48, "silu")}


def tiny(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_norms_of_each_family_are_found_with_kind_and_eps(name):
    model = tiny(name)
    fam = family_of(model)
    assert fam.name == name
    found = [n for n, m in model.named_modules() if is_norm(m)]
    assert sorted(found) == sorted(norm_paths(model))  # the family describes every norm transformers built, no other
    for path in norm_paths(model):
        module = get_module(model, path)
        assert norm_kind(module) == fam.norm_kind
        assert norm_eps(module) == pytest.approx(getattr(model.config, fam.eps_key))
    block = blocks(model)[0]
    for path in (fam.attn, fam.mlp, *fam.qkv, fam.attn_out, *fam.mlp_in, fam.mlp_out):
        assert not is_norm(get_module(block, path)) and norm_kind(get_module(block, path)) is None
    assert not is_norm(model) and norm_eps(get_module(model, fam.tok_emb)) is None


def test_torch_norms_and_bert():
    assert (norm_kind(nn.LayerNorm(8, eps=1e-3)), norm_eps(nn.LayerNorm(8, eps=1e-3))) == ("layernorm", 1e-3)
    assert (norm_kind(nn.RMSNorm(8, eps=1e-4)), norm_eps(nn.RMSNorm(8, eps=1e-4))) == ("rmsnorm", 1e-4)
    assert norm_eps(nn.RMSNorm(8)) is None  # eps=None: the input dtype's machine epsilon, not a number we can read
    assert not is_norm(nn.Linear(8, 8)) and not is_norm(nn.Sequential(nn.LayerNorm(8)))
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                layer_norm_eps=1e-7))
    norms = {n: m for n, m in bert.named_modules() if is_norm(m)}
    assert sorted(norms) == sorted(n for n, _ in bert.named_modules() if n.endswith("LayerNorm"))
    assert {norm_kind(m) for m in norms.values()} == {"layernorm"} and {norm_eps(m) for m in norms.values()} == {1e-7}


def test_switchable_norm_keeps_the_kind_and_eps_of_its_source():
    from surgery.remove_ln.fake_ln import SwitchableLayerNorm

    ln, rms = SwitchableLayerNorm(nn.LayerNorm(8, eps=1e-3)), SwitchableLayerNorm(LlamaRMSNorm(8, eps=1e-4))
    assert (norm_kind(ln), norm_eps(ln), ln.center) == ("layernorm", 1e-3, True)
    assert (norm_kind(rms), norm_eps(rms), rms.center) == ("rmsnorm", 1e-4, False)


def test_set_norm_eps_writes_the_attribute_the_module_reads():
    ln, rms = nn.LayerNorm(8), LlamaRMSNorm(8)
    set_norm_eps(ln, 1e12)
    set_norm_eps(rms, 1e12)
    assert ln.eps == rms.variance_epsilon == 1e12
    with pytest.raises(Exception, match="cannot set the epsilon of a Linear"):
        set_norm_eps(nn.Linear(2, 2), 1.0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_facts_agree_with_the_config(name):
    config = CONFIGS[name]()
    fam = family_of(config)
    context, width, act = EXPECTED[name]
    assert fam.context_length(config) == context_length_of(config) == context
    assert fam.attention_span(config) == context  # no sliding window
    assert fam.mlp_width(config) == width
    assert fam.activation(config) == act
    assert fam.standard_attn_scale(config)
    assert not fam.hybrid and type(tiny(name)).__name__ == fam.hf_architecture


def test_gpt2_default_mlp_width_and_attention_scaling():
    assert GPT2.mlp_width(GPT2Config(n_embd=32, n_head=2)) == 128  # n_inner None: 4 * d
    assert not GPT2.standard_attn_scale(GPT2Config(scale_attn_by_inverse_layer_idx=True))
    assert not GPT2.standard_attn_scale(GPT2Config(scale_attn_weights=False))


def test_rotary_settings():
    assert GPT2.rotary(CONFIGS["gpt2"]()) is None
    neox = CONFIGS["gpt_neox"]()
    assert GPT_NEOX.rotary(neox) == Rotary("default", 0.25, 10000.0)
    llama = LlamaConfig(hidden_size=32, num_attention_heads=4, rope_theta=5e5)
    assert LLAMA.rotary(llama) == Rotary("default", 1.0, 5e5)
    # transformers 4.x fields, read when the config has no rope_parameters
    assert GPT_NEOX.rotary(SimpleNamespace(rotary_pct=0.5, rotary_emb_base=123.0)) == Rotary("default", 0.5, 123.0)


def test_sliding_window_caps_the_attention_span():
    mistral = MistralConfig(max_position_embeddings=64, sliding_window=16)
    assert family_of(mistral) is LLAMA and LLAMA.context_length(mistral) == 64 and LLAMA.attention_span(mistral) == 16
    qwen2 = Qwen2Config(max_position_embeddings=64, sliding_window=16, use_sliding_window=False)
    assert LLAMA.attention_span(qwen2) == 64


def test_context_length_of_any_model():
    assert context_length_of(BertConfig(max_position_embeddings=33)) == 33  # no family: the families' fields
    assert context_length_of(SimpleNamespace(model_type="hybrid_gpt2", n_positions=32)) == 32  # a config.json dict
    assert context_length_of(SimpleNamespace(model_type="t5")) is None


@pytest.mark.slow
def test_every_family_has_its_hybrid_without_importing_the_hybrid_model():
    """The hybrids are described in families.py itself: a hybrid config is recognised before surgery.xatl is imported."""
    code = ("import sys; from types import SimpleNamespace; from surgery.families import family_of; "
            "f = family_of(SimpleNamespace(model_type='hybrid_qwen2')); "
            "print(f.name, f.hybrid, f.final_norm, 'surgery.xatl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["hybrid_llama", "True", "model.norm", "False"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_cache_arg_is_what_the_layer_and_its_attention_take(name):
    from surgery.xatl.hybrid.cache import CACHE_ARG
    from surgery.xatl.hybrid.model import LAYER_CACHE_NAMES

    model = tiny(name)
    fam = family_of(model)
    arg = fam.layer_cache_arg or CACHE_ARG
    layer = type(blocks(model)[0])
    attn = type(get_module(blocks(model)[0], fam.attn))
    for cls in (layer, attn):
        params = inspect.signature(cls.forward).parameters
        assert arg in params, f"{cls.__name__}.forward takes no {arg!r}: set Family.layer_cache_arg of {name}"
    assert arg in LAYER_CACHE_NAMES


def test_every_family_is_described_completely():
    for fam in FAMILIES.values():
        assert fam.hf_architecture and fam.context_key and fam.mlp_width_key and fam.activation_key
        assert (fam.pos_emb is None) == (fam.rotary_base_key is not None)
