"""The hybrid GPT-2: save/load round trip, generation with the recurrent cache, config errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.families import family_of, norm_paths
from surgery.xatl import HybridGPT2Config, HybridGPT2LMHeadModel

torch.set_num_threads(1)


def tiny(mixer: str, attn_layers=(), **kw) -> HybridGPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = HybridGPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, mixer=mixer,
                           attn_layers=list(attn_layers), bos_token_id=None, eos_token_id=None, **kw)
    return HybridGPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("mixer,attn_layers", [("mamba", []), ("retention", [1]), ("gla", [0])])
def test_save_and_load_reproduce_logits(tmp_path, mixer, attn_layers):
    model = tiny(mixer, attn_layers)
    ids = torch.randint(0, 64, (2, 24))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridGPT2LMHeadModel and loaded.config.attn_layers == attn_layers
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("mixer,attn_layers", [("mamba", []), ("retention", [1]), ("gla", [0])])
def test_generate_equals_argmax_over_full_forwards(mixer, attn_layers):
    model = tiny(mixer, attn_layers)
    prompt = torch.randint(0, 64, (2, 7))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out.sequences, seq)
    cache = out.past_key_values
    assert cache.get_seq_length() == 7 + 12 - 1  # the last token is never fed back
    for i in model.mixer_layers():  # mixer layers hold a fixed-size state, no per-token keys/values
        layer = cache.layers[i]
        assert not hasattr(layer, "keys") and all(s.shape[0] == 2 for s in layer.recurrent_states.values())


def test_cached_logits_equal_full_forward():
    model = tiny("gla", [1])
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :13], use_cache=True)
        steps = [out.logits]
        for t in range(13, 20):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_module_layout_is_gpt2s():
    model = tiny("mamba", [1])
    assert family_of(model).blocks == "transformer.h"
    assert len(norm_paths(model)) == 5
    assert type(model.transformer.h[0].attn).__name__ == "MixerAttention"
    assert type(model.transformer.h[1].attn).__name__ == "GPT2Attention"
    assert model.config.layer_types == ["linear_attention", "full_attention"]


def test_config_errors():
    with pytest.raises(SurgeryError, match="unknown mixer 'rnn'"):
        tiny("rnn")
    with pytest.raises(SurgeryError, match=r"attn_layers \[5\] out of range for a 2-layer model"):
        tiny("mamba", [5])
    model = tiny("mamba")
    with pytest.raises(SurgeryError, match="padding masks are not supported"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))


def test_load_causal_lm_finds_the_hybrid_in_a_fresh_process(tmp_path):
    """`surgery.loading` registers hybrid_gpt2 itself: a new interpreter that imports nothing from
    surgery.xatl still loads a saved hybrid (as `surgery eval` does)."""
    import subprocess
    import sys

    model = tiny("retention", [1])
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from surgery.loading import load_causal_lm; m = load_causal_lm(sys.argv[1]).eval(); "
            "print(type(m).__name__); torch.save(m(torch.load(sys.argv[1] + '/ids.pt')).logits, sys.argv[1] + '/out.pt')")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "HybridGPT2LMHeadModel"
    # a fresh process may pick other CPU kernels (thread count, attention backend): equal to float rounding
    torch.testing.assert_close(torch.load(tmp_path / "out.pt").detach(), ref, rtol=0, atol=1e-6)
