"""Hybrids of every family (GPT-2, GPT-NeoX parallel and sequential, Llama with grouped KV heads): module
layout, chunked = recurrent, cached decoding, generate after save/reload, errors."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.families import family_of, get_module
from surgery.xatl import HYBRID_MODELS, hybrid_config_from
from surgery.xatl.hybrid.cache import CACHE_ARG, CACHE_NAMES, HybridCache
from xatl_models import KINDS, attn, randomize_mixers, source_and_hybrid

MIXERS = ("mamba", "retention", "gla")
SMALL_CHUNKS = {"mamba": {"chunk": 5}, "retention": {"chunk": 8}, "gla": {"chunk": 8}}


@pytest.mark.parametrize("kind", KINDS)
def test_a_hybrid_is_the_source_class_with_mixers_in_place_of_attention(kind):
    src, hyb = source_and_hybrid(kind, "gla", [1])
    assert isinstance(hyb, type(src)) and type(hyb) is HYBRID_MODELS["hybrid_" + src.config.model_type]
    fs, fh = family_of(src), family_of(hyb)
    assert fh.name == "hybrid_" + fs.name and fh.attn == fs.attn and fh.blocks == fs.blocks
    assert type(attn(hyb, 0)).__name__ == "MixerAttention" and type(attn(hyb, 1)) is type(attn(src, 1))
    assert hyb.mixer_layers() == [0]
    # every other module is the source's, under the same name and shape
    src_params = {n: p.shape for n, p in src.named_parameters() if f".0.{fs.attn}." not in n}
    hyb_params = {n: p.shape for n, p in hyb.named_parameters() if ".mixer." not in n}
    assert src_params == hyb_params
    if kind == "neox":
        assert hyb.config.use_parallel_residual


class Recurrent(nn.Module):
    """A mixer run step by step (its `recurrent` form)."""

    def __init__(self, mixer):
        super().__init__()
        self.inner = mixer

    def forward(self, x, state=None):
        return self.inner(x, state, recurrent=True)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_recurrent(kind, mixer):
    """Full forwards with the chunked form (several chunks; autograd on, as in training) equal the same model
    with every mixer in its step-by-step form; tolerance: float32 rounding of differently ordered sums."""
    opts = {**({"expand": 1, "d_state": 8} if mixer == "mamba" else {}), **SMALL_CHUNKS[mixer]}
    _, model = source_and_hybrid(kind, mixer, [1], opts)
    randomize_mixers(model)
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(5))
    chunked = model(ids, use_cache=False).logits
    for i in model.mixer_layers():
        attn(model, i).mixer = Recurrent(attn(model, i).mixer)
    with torch.no_grad():
        recurrent = model(ids, use_cache=False).logits
    torch.testing.assert_close(chunked.detach(), recurrent, rtol=0, atol=2e-5 * float(recurrent.abs().max()))


def step_by_step(model, seq, steps: int):
    """Greedy continuation by argmax over full forwards (no cache): the reference for generation."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


GENERATE = ([(k, m, [], None) for k in KINDS for m in MIXERS] + [(k, "gla", [1], None) for k in KINDS]
            + [("llama", "mamba", [0], None)]
            # softmax windows (4 and 3 tokens) that the 24 generated tokens run well past
            + [("gpt2", "gla", [1], {"key_dim": 32, "window": 4}), ("llama", "retention", [], {"window": 3})])


@pytest.mark.parametrize("kind,mixer,attn_layers,options", GENERATE)
def test_generate_on_reloaded_hybrid_equals_argmax_over_full_forwards(tmp_path, kind, mixer, attn_layers, options):
    _, model = source_and_hybrid(kind, mixer, attn_layers, options)
    randomize_mixers(model).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__.startswith("Hybrid") and model.config.attn_layers == attn_layers
    model.generation_config.eos_token_id = None  # no stop token, and none suppressed: greedy all the way
    prompt, new = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2)), 24
    out = model.generate(prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, step_by_step(model, prompt, new))
    cache = out[CACHE_ARG]
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == 6 + new - 1
    assert sorted(cache.mixer_states) == model.mixer_layers()
    for state in cache.mixer_states.values():  # fixed-size states, not per-token keys/values
        assert all(s.shape[0] == 2 and 6 + new - 1 not in s.shape for s in state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CACHE_NAMES)
def test_cached_logits_equal_full_forward_under_either_cache_name(kind, name):
    """A prompt, then one token at a time through the cache (kept attention at layer 1, rotary positions
    continuing where the cache left off): every step's logits equal the full forward's; a decode without the
    state misses by far more, so the check can fail."""
    _, model = source_and_hybrid(kind, "retention", [1])
    randomize_mixers(model)
    ids = torch.randint(0, 64, (2, 26), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :11], use_cache=True)
        steps, stateless = [out.logits], []
        for t in range(11, 26):
            cache = out[CACHE_ARG]
            assert cache.get_seq_length() == t
            out = model(ids[:, t : t + 1], use_cache=True, **{name: cache})
            steps.append(out.logits)
            stateless.append(model(ids[:, t : t + 1], position_ids=torch.tensor([[t]]), use_cache=False).logits)
    scale = full.abs().max()
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5 * scale
    assert (torch.cat(stateless, 1) - full[:, 11:]).abs().max() > 0.1 * scale


@pytest.mark.slow
def test_plain_import_surgery_loads_every_familys_hybrid(tmp_path):
    """A fresh interpreter that runs `import surgery` and transformers' Auto class loads each saved hybrid."""
    import subprocess
    import sys

    for kind in ("neox", "llama"):
        source_and_hybrid(kind, "mamba", [0])[1].save_pretrained(tmp_path / kind)
    code = ("import sys, surgery; from transformers import AutoModelForCausalLM; "
            "print(*[type(AutoModelForCausalLM.from_pretrained(p)).__name__ for p in sys.argv[1:]])")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "neox"), str(tmp_path / "llama")],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "HybridGPTNeoXForCausalLM HybridLlamaForCausalLM"


def test_errors():
    src, model = source_and_hybrid("llama", "gla", [])
    with pytest.raises(SurgeryError, match="padding masks are not supported"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(SurgeryError, match=r"attn_layers \[2\] out of range for a 2-layer model"):
        HYBRID_MODELS["hybrid_llama"](hybrid_config_from(src.config, "gla", {}, [2]))
    with pytest.raises(SurgeryError, match="model type 'hybrid_llama' has no hybrid"):
        hybrid_config_from(model.config, "gla")
    src.config.model_type = "qwen3"
    with pytest.raises(SurgeryError, match="'qwen3' has no hybrid: its attention normalizes queries and keys"):
        hybrid_config_from(src.config, "gla")
