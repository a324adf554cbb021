"""The hybrid GPT-2: save/load round trip, generation with the recurrent cache, config errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from surgery.errors import SurgeryError
from surgery.families import family_of, norm_paths
from surgery.xatl import HybridGPT2Config, HybridGPT2LMHeadModel
from surgery.xatl.hybrid.cache import CACHE_ARG, CACHE_NAMES, HybridCache
from xatl_models import randomize_mixers



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


def step_by_step(model, seq, steps: int):
    """Greedy continuation by argmax over full forwards (no cache): the reference for generation."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


HYBRIDS = [(m, a) for m in ("mamba", "retention", "gla") for a in ([], [1])]


@pytest.mark.parametrize("mixer,attn_layers", HYBRIDS)
def test_generate_on_reloaded_hybrid_equals_argmax_over_full_forwards(tmp_path, mixer, attn_layers):
    randomize_mixers(tiny(mixer, attn_layers)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt, new = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2)), 40
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, step_by_step(model, prompt, new))
    cache = out[CACHE_ARG]
    assert isinstance(cache, HybridCache)
    assert cache.get_seq_length() == 7 + new - 1  # generate never feeds back the token it chose last
    assert sorted(cache.mixer_states) == model.mixer_layers()
    for state in cache.mixer_states.values():  # fixed-size states, not per-token keys/values
        assert all(s.shape[0] == 2 and 7 + new - 1 not in s.shape for s in state)


@pytest.mark.parametrize("mixer,attn_layers", HYBRIDS)
@pytest.mark.parametrize("name", CACHE_NAMES)
def test_cached_logits_equal_full_forward_under_either_cache_name(mixer, attn_layers, name):
    """A prompt, then one token at a time with the cache: every step's logits equal the full forward's, and
    the cache counts prompt + steps. A decode that loses the state misses by far more (checked too)."""
    model = randomize_mixers(tiny(mixer, attn_layers))
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :13], use_cache=True)
        steps, stateless = [out.logits], []
        for t in range(13, 30):
            cache = out[CACHE_ARG]
            assert cache.get_seq_length() == t
            out = model(ids[:, t : t + 1], use_cache=True, **{name: cache})
            steps.append(out.logits)
            stateless.append(model(ids[:, t : t + 1], position_ids=torch.tensor([[t]])).logits)
    assert out[CACHE_ARG].get_seq_length() == 30
    scale = full.abs().max()
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5 * scale
    assert (torch.cat(stateless, 1) - full[:, 13:]).abs().max() > 0.1 * scale


def test_cache_errors():
    model = tiny("gla", [1])
    ids = torch.randint(0, 64, (1, 5))
    cache = model(ids, use_cache=True)[CACHE_ARG]
    with pytest.raises(SurgeryError, match="pass the cache once"):
        model(ids[:, :1], cache=cache, past_key_values=cache)
    with pytest.raises(SurgeryError, match="keeps its state in a HybridCache, not a DynamicCache: pass no cache"):
        model(ids[:, :1], **{CACHE_ARG: DynamicCache()})


def test_beam_search_reorders_mixer_states():
    """Beam search keeps the rows of the surviving beams in every mixer state: the score generate reports for
    its best beam equals the one recomputed with full forwards."""
    model = randomize_mixers(tiny("retention", [1]))
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    seq = out.sequences[0:1]
    with torch.no_grad():
        logp = model(seq, use_cache=False).logits.log_softmax(-1)
    score = logp[0, 5:-1].gather(-1, seq[0, 6:, None]).sum()
    assert out.sequences_scores[0].item() == pytest.approx(score.item(), abs=1e-4)


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


@pytest.mark.slow
def test_load_causal_lm_finds_the_hybrid_in_a_fresh_process(tmp_path):
    """`surgery.models.loading` registers hybrid_gpt2 itself: a new interpreter that imports nothing from
    surgery.xatl still loads a saved hybrid (as `surgery eval` does)."""
    import subprocess
    import sys

    model = tiny("retention", [1])
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from surgery.models.loading import load_causal_lm; m = load_causal_lm(sys.argv[1]).eval(); "
            "print(type(m).__name__); torch.save(m(torch.load(sys.argv[1] + '/ids.pt')).logits, sys.argv[1] + '/out.pt')")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "HybridGPT2LMHeadModel"
    # a fresh process may pick other CPU kernels (thread count, attention backend): equal to float rounding
    torch.testing.assert_close(torch.load(tmp_path / "out.pt").detach(), ref, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_plain_import_surgery_is_enough_to_load_a_saved_hybrid(tmp_path):
    """A fresh interpreter that runs `import surgery` and transformers' own Auto class loads a hybrid."""
    import subprocess
    import sys

    tiny("gla", [1]).save_pretrained(tmp_path)
    code = ("import sys, surgery; from transformers import AutoModelForCausalLM; "
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "HybridGPT2LMHeadModel"


def test_a_saved_hybrid_says_in_its_config_how_to_load_it(tmp_path):
    """Without `import surgery` or trust_remote_code, transformers suggests upgrading itself; the saved
    config.json says what to do instead, and names the code saved beside the weights."""
    import json

    tiny("gla", [1]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hybrid_gpt2"
    assert config["how_to_load"].startswith("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) runs the code")
    assert "`pip install lm-surgery`, then `import surgery` before from_pretrained" in config["how_to_load"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid.HybridGPT2LMHeadModel"
