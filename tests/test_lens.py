"""`surgery.lens.load_hooked`: HF GPT-2 -> TransformerLens, with and without LayerNorm, offline (other families:
test_lens_families.py).

Tolerances: HF and TransformerLens compute the same float32 function in a different order (split vs fused QKV,
folded LN weights), so logits agree to ~1e-7 relative (measured 1.2e-7 to 1.6e-7); we allow 1e-6 relative and
1e-4 absolute on logits of magnitude ~20. The LN-free export's eps trick differs from exact centering by
var/(2 eps) ~ 1e-12 relative, far below that.
"""

from __future__ import annotations

import pytest
import torch
from lens_models import make_ln_free, tiny_gpt2
from transformers import GPT2Config, OPTConfig, OPTForCausalLM

from surgery.errors import SurgeryError
from surgery.lens import has_normalization, load_hooked, tl_state_dict

SHAPES = [{}, dict(n_layer=3, n_head=6, n_embd=48, n_positions=100, vocab_size=80)]


def _logits(hf, hooked, n_tokens=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hf.config.vocab_size, (3, n_tokens), generator=gen)
    with torch.no_grad():
        return hf(tokens).logits, hooked(tokens)


@pytest.mark.parametrize("ln_free", [True, False], ids=["ln_free", "with_ln"])
@pytest.mark.parametrize("shape", SHAPES, ids=["tiny", "3x6x48"])
def test_logits_match_hf(ln_free, shape):
    hf = tiny_gpt2(**shape)
    if ln_free:
        make_ln_free(hf)
    ref, out = _logits(hf, load_hooked(hf))
    assert out.shape == ref.shape
    assert (ref - out).abs().max().item() < 1e-4
    assert ((ref - out).norm() / ref.norm()).item() < 1e-6
    assert ref.abs().max().item() > 5.0  # the comparison is not on near-zero logits


def test_ln_free_model_has_no_normalization():
    hooked = load_hooked(make_ln_free(tiny_gpt2()))
    assert not has_normalization(hooked)
    _, cache = hooked.run_with_cache(torch.zeros(1, 8, dtype=torch.long))
    assert not [k for k in cache.keys() if "hook_scale" in k or "hook_normalized" in k]
    assert hooked.cfg.normalization_type is None


def test_model_with_ln_keeps_hook_scale():
    hooked = load_hooked(tiny_gpt2())
    assert has_normalization(hooked)
    _, cache = hooked.run_with_cache(torch.zeros(1, 8, dtype=torch.long))
    assert {"blocks.0.ln1.hook_scale", "blocks.1.ln2.hook_scale", "ln_final.hook_scale"} <= set(cache.keys())


def test_centering_is_folded_into_readers():
    """Every reading weight of an LN-free model sums to zero over d_model: x -> x + a*1 changes nothing it reads."""
    sd = tl_state_dict(make_ln_free(tiny_gpt2()))
    for key in ("blocks.0.attn.W_Q", "blocks.1.attn.W_V", "blocks.0.mlp.W_in", "unembed.W_U"):
        dim = 1 if "attn" in key else 0
        assert sd[key].double().sum(dim).abs().max().item() < 1e-5 * sd[key].abs().max().item(), key
    # ...whereas the raw HF weights do not (the centering would be lost by copying them).
    raw = make_ln_free(tiny_gpt2()).transformer.h[0].attn.c_attn.weight
    assert raw.sum(0).abs().max().item() > 1e-2


def test_load_from_directory_with_tokenizer(tmp_path):
    from lens_models import save_model_dirs, write_text_corpus

    corpus = write_text_corpus(tmp_path / "corpus.jsonl", n_docs=40)
    base_dir, free_dir = save_model_dirs(tmp_path, corpus, vocab=280)
    for d, norm in ((base_dir, True), (free_dir, False)):
        hooked = load_hooked(d)
        assert has_normalization(hooked) is norm
        assert hooked.tokenizer is not None
        ids = hooked.tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
        assert hooked(ids).shape == (1, ids.shape[1], hooked.cfg.d_vocab)


def test_error_missing_directory(tmp_path):
    with pytest.raises(SurgeryError, match="does not exist"):
        load_hooked(tmp_path / "nope")


def test_error_directory_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SurgeryError, match="not a model directory"):
        load_hooked(tmp_path)


def test_error_unsupported_family(tmp_path):
    cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, word_embed_proj_dim=32)
    OPTForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(SurgeryError, match=r"model type 'opt' is not supported \(supported: .*gpt2, gpt_neox, .*llama"):
        load_hooked(tmp_path)


def test_error_not_a_model_object():
    with pytest.raises(SurgeryError, match="not a GPT2Config"):
        load_hooked(GPT2Config())


def test_error_ln_free_flag_with_small_eps():
    hf = tiny_gpt2()
    hf.config.surgery_ln_free = {"scale": 1e6}
    with pytest.raises(SurgeryError, match="still normalize per token"):
        load_hooked(hf)
