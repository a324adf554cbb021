"""TransformerLens conversion of GPT-NeoX (parallel and sequential residual, partial rotary) and Llama (RMSNorm,
grouped-query attention with 2 KV heads of 4, SwiGLU, tied head), with norms and LN-free.

LN-free models are built two ways: with our export (`prepare_for_removal`, measure, `go_fake`, `export_ln_free`), and by hand as the papers publish
(every norm's weight x 1e6/sigma, eps 1e12, without our export code). Every parameter is random (norm gains
~N(1, 0.3), biases ~N(0, 0.3)), so a norm folded into the wrong reader, a missing centering or bias, or a wrong
rotary order changes the logits by far more than the tolerances.

Tolerances: HF and TransformerLens compute the same float32 function in a different order (fused vs split Q/K/V,
folded norm weights, GQA by repeat), so logits agree to ~1e-7 absolute on logits of magnitude ~1 (measured
1.5e-7 to 3e-7); we allow 1e-5 absolute and 1e-5 relative. The eps trick of an LN-free model differs from the
folded affine map by var / (2 eps) ~ 1e-12 relative. DLA is summed in float64 and checked to 1e-5 relative
(the LN-free gate of `surgery verify`); a model with norms misses it by order 1e-2 or more.
"""

from __future__ import annotations

import json

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.families import family_of, get_module, norm_paths
from surgery.lens import has_normalization, load_hooked, tl_config, tl_state_dict
from surgery.lens.checks import dla_check, residual_components, verify_ln_free
from surgery.remove_ln.export import export_ln_free
from surgery.remove_ln.points import prepare_for_removal, token_context
from remove_ln_models import tiny_model

KINDS = ["neox", "neox_seq", "llama"]
SCALE, EPS = 1e6, 1e12


@torch.no_grad()
def by_hand(kind: str, seed: int = 0, skip: str | None = None):
    """A tiny model made LN-free as published: each norm's weight x 1e6/sigma (sigma: the std of its input over
    random tokens, RMS for an RMSNorm), bias kept, eps 1e12; the norm at path `skip` is left as it was."""
    model = tiny_model(kind, seed)
    paths = norm_paths(model)
    inputs = {}
    handles = [get_module(model, p).register_forward_hook(lambda m, a, o, p=p: inputs.setdefault(p, a[0])) for p in paths]
    model(torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(seed)))
    for h in handles:
        h.remove()
    rms = family_of(model).norm_kind == "rmsnorm"
    for path in paths:
        if path == skip:
            continue
        x, norm = inputs[path].double(), get_module(model, path)
        sigma = (x.pow(2).mean() if rms else x.var(-1, unbiased=False).mean()).sqrt().item()
        norm.weight.mul_(SCALE / sigma)
        setattr(norm, "variance_epsilon" if rms else "eps", EPS)
    if skip is None:
        setattr(model.config, family_of(model).eps_key, EPS)
    return model


@torch.no_grad()
def exported(kind: str, seed: int = 0, vocab: int = 64):
    """Our LN-free export of a tiny model: every norm measured on training forwards, made fake, exported
    (as `removed` in test_remove_ln_families, with any vocabulary)."""
    model = tiny_model(kind, seed, vocab)
    points = prepare_for_removal(model)
    model.train()
    for _ in range(3):
        token_context(points).eot_mask = None
        model(torch.randint(0, vocab, (4, 24)))
        token_context(points).flush()
    model.eval()
    for ln in points.values():
        ln.go_fake()
    return export_ln_free(model)


def _tokens(n=3, length=40, seed=0):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def _assert_logits_match(hf, hooked, tokens):
    with torch.no_grad():
        ref, out = hf(tokens).logits, hooked(tokens)
    assert out.shape == ref.shape
    assert (ref - out).abs().max().item() < 1e-5
    assert ((ref - out).norm() / ref.norm()).item() < 1e-5
    assert ref.abs().max().item() > 0.3  # not a comparison of near-zero logits


@pytest.mark.parametrize("kind", KINDS)
def test_model_with_norms_keeps_them(kind):
    hf = tiny_model(kind)
    hooked = load_hooked(hf)
    assert hooked.cfg.normalization_type == ("RMS" if kind == "llama" else "LN") and has_normalization(hooked)
    _, cache = hooked.run_with_cache(_tokens(1, 8))
    assert {"blocks.0.ln1.hook_scale", "blocks.1.ln2.hook_scale", "ln_final.hook_scale"} <= set(cache.keys())
    _assert_logits_match(hf, hooked, _tokens())
    assert dla_check(hooked, _tokens(2, 24))["dla_relative_error"] > 1e-3  # the per-token scale is not linear


@pytest.mark.parametrize("build", [exported, by_hand], ids=["export", "by_hand"])
@pytest.mark.parametrize("kind", KINDS)
def test_ln_free_model_loads_without_normalization(kind, build):
    hf = build(kind)
    hooked = load_hooked(hf)
    assert hooked.cfg.normalization_type is None and not has_normalization(hooked)
    logits, cache = hooked.run_with_cache(_tokens())
    assert not [k for k in cache.keys() if "hook_scale" in k or "hook_normalized" in k]
    _assert_logits_match(hf, hooked, _tokens())
    # DLA: the direct contributions of the embedding, every head, every b_O and every MLP through the (now linear)
    # final map W_U, b_U sum to the logits.
    _, _, parts = residual_components(hooked, cache)
    direct = parts @ hooked.W_U.detach().double()  # (component, batch, pos, vocab)
    total = direct.sum(0) + hooked.b_U.detach().double()
    assert ((total - logits.double()).norm() / logits.double().norm()).item() < 1e-5
    result = verify_ln_free(hf)  # the gates of `surgery verify`
    assert result["dla_relative_error"] < 1e-5 and result["hf_scale_spread"] < 1e-6


def test_config_describes_each_family():
    neox, seq, llama = (tl_config(tiny_model(k).config, ln_free=False) for k in KINDS)
    assert neox["parallel_attn_mlp"] and not seq["parallel_attn_mlp"]
    assert (neox["rotary_dim"], seq["rotary_dim"]) == (2, 4)  # d_head 8 x rotary_pct 0.25 / 0.5
    assert neox["act_fn"] == "gelu" and not neox["gated_mlp"] and neox["normalization_type"] == "LN"
    assert neox["positional_embedding_type"] == "rotary" and neox["rotary_base"] == 10000.0
    assert llama["n_key_value_heads"] == 2 and llama["n_heads"] == 4 and llama["gated_mlp"] and llama["act_fn"] == "silu"
    assert llama["normalization_type"] == "RMS" and llama["final_rms"] and llama["d_mlp"] == 48


def test_parallel_blocks_have_no_resid_mid_and_sequential_ones_do():
    parallel, sequential = load_hooked(tiny_model("neox")), load_hooked(tiny_model("neox_seq"))
    assert "blocks.0.hook_resid_mid" not in parallel.hook_dict
    assert "blocks.0.hook_resid_mid" in sequential.hook_dict


def test_llama_tied_head_is_untied_with_the_final_norm_folded():
    hf = by_hand("llama")
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    sd = tl_state_dict(hf)
    gain = (hf.model.norm.weight / EPS**0.5).float()
    assert torch.allclose(sd["unembed.W_U"], gain[:, None] * hf.model.embed_tokens.weight.T, rtol=1e-6)
    assert torch.equal(sd["embed.W_E"], hf.model.embed_tokens.weight) and sd["unembed.b_U"].abs().max() == 0
    assert sd["blocks.0.attn.W_K"].shape == (2, 32, 8) and sd["blocks.0.attn.W_Q"].shape == (4, 32, 8)


@pytest.mark.parametrize("kind, path", [("neox", "gpt_neox.layers.1.post_attention_layernorm"), ("llama", "model.norm")])
def test_partly_converted_model_is_refused_naming_the_norm(kind, path):
    with pytest.raises(SurgeryError, match=rf"only partly LN-free: .* still normalize per token: {path} \(eps"):
        load_hooked(by_hand(kind, skip=path))


def test_unsupported_family_is_refused():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=64, head_dim=8)
    model = Qwen3ForCausalLM(config)
    model.config.model_type = "qwen3_moe"  # a model type no family describes
    with pytest.raises(SurgeryError, match="model type 'qwen3_moe' is not supported .*qwen3.*add a Family entry"):
        load_hooked(model)


def test_hybrid_model_is_refused():
    from surgery.xatl import hybrid_config_from, hybrid_model

    hybrid = hybrid_model(hybrid_config_from(tiny_model("llama").config, "retention", attn_layers=[0]))
    with pytest.raises(SurgeryError, match="supports the gpt2, gpt_neox, llama, qwen3, gemma3, olmo2 families, not hybrid_llama"):
        load_hooked(hybrid)


def test_gated_mlp_biases_are_refused_by_either_transformer_lens():
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.lens.hooked import transformer_lens_major

    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                         vocab_size=64, mlp_bias=True)
    hf = LlamaForCausalLM(config)
    torch.nn.init.normal_(hf.model.layers[0].mlp.up_proj.bias)
    why = ("TransformerLens 4.x's native gated MLP has no biases" if transformer_lens_major() >= 4 else
           r"TransformerLens 3.x's gated MLP has no gate bias and adds b_in after the gate product")
    with pytest.raises(SurgeryError, match=rf"blocks.0.mlp.b_in is not zero, but {why}"):
        load_hooked(hf)


# --- surgery verify on each family -------------------------------------------------------------------------------

VOCAB = 280  # a byte-level BPE has 257 tokens before any merge
ARGS = ["--block-size", "64", "--seg-len", "16", "--prompts", "4", "--val-blocks", "6", "--dla-blocks", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lens_models import write_text_corpus

    from surgery.data.corpus import Corpus
    from surgery.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("families")
    path = write_text_corpus(root / "corpus.jsonl", n_docs=120)
    tokenizer = train_bpe(Corpus(path), VOCAB)
    assert len(tokenizer) <= VOCAB
    return path, tokenizer


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "neox_seq" else k for k in KINDS])
def test_verify_passes_ln_free_gates_on_each_family(kind, corpus, tmp_path, monkeypatch, capsys):
    from surgery.cli.entry import main

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    data, tokenizer = corpus
    model_dir = _save(exported(kind, vocab=VOCAB), tokenizer, tmp_path / "free")
    base_dir = _save(tiny_model(kind, vocab=VOCAB), tokenizer, tmp_path / "base")
    out = tmp_path / "out"
    assert main(["verify", model_dir, "--baseline", base_dir, "--out", str(out), "--data", data, *ARGS]) == 0
    assert "LN-free checks passed" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    free, base = report["results"]["model (LN-free)"], report["results"]["baseline (with LN)"]
    assert report["failures"] == [] and free["has_normalization"] is False and base["has_normalization"] is True
    assert free["dla_relative_error"] < 1e-5 < 1e-3 < base["dla_relative_error"]
    assert free["hf_tl_max_abs_logit_diff"] < 1e-4 and base["hf_tl_max_abs_logit_diff"] < 1e-4
    assert len(free["patching"]["activation_patching"]) == 2 * 4


@pytest.mark.parametrize("arg, value, message", [
    ("--seg-len", "0", "--seg-len 0 is out of range: it must be an integer from 1 to half the model's context"),
    ("--prompts", "-3", "--prompts -3 is out of range: it must be an integer >= 1"),
    ("--block-size", "1", "--block-size 1 is out of range: it must be an integer >= 2"),
    ("--seg-len", "33", "--seg-len 33 makes 66-token prompts, longer than the context (64): it must be an integer from 1 to 32"),
])
def test_verify_refuses_numbers_out_of_range_in_one_line(arg, value, message, corpus, tmp_path, capsys):
    from surgery.cli.entry import main

    model_dir = _save(tiny_model("llama", vocab=VOCAB), corpus[1], tmp_path / "m")
    capsys.readouterr()
    assert main(["verify", model_dir, "--out", str(tmp_path / "out"), arg, value]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # (transformers may print a loading progress bar first)
    assert err.strip().splitlines()[-1] == f"surgery verify: error: {message}"
