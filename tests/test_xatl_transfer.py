"""transfer_shared_weights: copied tensors equal the source's, the rest untouched, clear errors."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from surgery.errors import SurgeryError
from surgery.xatl import HybridGPT2LMHeadModel, hybrid_config_from
from surgery.xatl.transfer.weights import COMPONENTS, transfer_shared_weights



def gpt2(n_embd=32, n_layer=2, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=64, n_positions=64, **kw))


def hybrid(src, mixer="retention", mixer_config=None, attn_layers=()):
    torch.manual_seed(2)
    return HybridGPT2LMHeadModel(hybrid_config_from(src.config, mixer, mixer_config, list(attn_layers)))


def test_default_components_copy_embeddings_norms_mlps_and_kept_attention():
    src = gpt2()
    tgt = hybrid(src, "mamba", attn_layers=[1])
    before = {n: p.clone() for n, p in tgt.named_parameters()}
    report = transfer_shared_weights(src, tgt)
    s, t = dict(src.named_parameters()), dict(tgt.named_parameters())
    expected = {n for n in s if ".attn." not in n or n.startswith("transformer.h.1.")}
    assert set(report.parameter_names) == expected
    for name in expected:
        assert torch.equal(t[name], s[name]), name
    assert report.num_params == sum(s[n].numel() for n in expected)
    for name in set(t) - expected:  # block 0's mixer untouched
        assert ".mixer." in name and torch.equal(t[name], before[name])
    assert tgt.lm_head.weight is tgt.transformer.wte.weight  # still tied
    assert "tied" in report.summary()


def test_attention_output_and_qkv_into_retention():
    src, d = gpt2(), 32
    tgt = hybrid(src, "retention")
    report = transfer_shared_weights(src, tgt, ["attn_out", "qkv"])
    for i in range(2):
        a, m = src.transformer.h[i].attn, tgt.transformer.h[i].attn.mixer
        assert torch.equal(m.out_proj.weight, a.c_proj.weight.T) and torch.equal(m.out_proj.bias, a.c_proj.bias)
        for j, lin in enumerate([m.q_proj, m.k_proj, m.v_proj]):  # Conv1D stores (in, out): columns Q|K|V
            assert torch.equal(lin.weight, a.c_attn.weight[:, j * d : (j + 1) * d].T)
            assert torch.equal(lin.bias, a.c_attn.bias[j * d : (j + 1) * d])
    assert len(report.copied) == 2 * 8


def test_mamba_in_the_llama_mapping_where_shapes_allow():
    src, d = gpt2(), 32
    tgt = hybrid(src, "mamba", {"expand": 1, "d_state": 32, "dt_rank": 4})
    report = transfer_shared_weights(src, tgt, ["attn_out", "qkv"])
    a, m = src.transformer.h[0].attn, tgt.transformer.h[0].attn.mixer
    W = a.c_attn.weight.T  # (3d, d): rows Q|K|V
    assert torch.equal(m.in_proj.weight[:d], W[2 * d :])  # V -> x
    assert torch.equal(m.x_proj.weight[4 : 4 + d], W[d : 2 * d])  # K -> B
    assert torch.equal(m.x_proj.weight[4 + d :], W[:d])  # Q -> C
    assert torch.equal(m.out_proj.weight, a.c_proj.weight.T)
    # partially overwritten parameters are reported but not offered for freezing
    assert "transformer.h.0.attn.mixer.x_proj.weight" not in report.parameter_names
    assert "transformer.h.0.attn.mixer.out_proj.weight" in report.parameter_names
    assert any("bias not copied" in n for n in report.notes)


def test_shape_mismatches_give_clear_errors():
    src = gpt2()
    with pytest.raises(SurgeryError, match=r"source width 32 differs from target width 64"):
        transfer_shared_weights(src, hybrid(gpt2(n_embd=64)))
    with pytest.raises(SurgeryError, match=r"source has 2 blocks, target 3"):
        transfer_shared_weights(src, hybrid(gpt2(n_layer=3)))
    with pytest.raises(SurgeryError, match=r"cannot copy transformer\.h\.0\.attn\.c_attn\[Q\] \(32, 32\) into .*q_proj"
                                           r"\.weight \(16, 32\).*GLAMixer: the mixer's shapes do not allow"):
        transfer_shared_weights(src, hybrid(src, "gla"), ["qkv"])
    with pytest.raises(SurgeryError, match=r"cannot copy .*c_proj \(32, 32\) into .*out_proj\.weight \(32, 64\)"):
        transfer_shared_weights(src, hybrid(src, "mamba"), ["attn_out"])
    with pytest.raises(SurgeryError, match="unknown transfer components \\['ffn'\\]; choose from: " + ", ".join(COMPONENTS)):
        transfer_shared_weights(src, hybrid(src), ["ffn"])
    untied = gpt2(tie_word_embeddings=False)
    with pytest.raises(SurgeryError, match="not tied to its embeddings but the target's is"):
        transfer_shared_weights(untied, hybrid(src))


def test_ln_free_source_gives_ln_free_target():
    """An export in the LN-free format (eps 1e12, LN weights 1e6, `surgery_ln_free`) transfers into a
    hybrid whose LNs compute exactly what the source's do."""
    src = gpt2(layer_norm_epsilon=1e12)
    src.config.surgery_ln_free = {"scale": 1e6}
    with torch.no_grad():
        for n, mod in src.named_modules():
            if isinstance(mod, torch.nn.LayerNorm) and not n.endswith("ln_f"):
                mod.weight.fill_(1e6)
                mod.bias.zero_()
    tgt = hybrid(src, "gla")
    assert tgt.config.layer_norm_epsilon == 1e12
    report = transfer_shared_weights(src, tgt)
    assert tgt.config.surgery_ln_free == {"scale": 1e6} and any("LN-free" in n for n in report.notes)
    x = torch.randn(3, 32) * 5
    for i in range(2):
        for ln in ("ln_1", "ln_2"):
            s, t = getattr(src.transformer.h[i], ln), getattr(tgt.transformer.h[i], ln)
            assert t.eps == 1e12 and torch.equal(t(x), s(x))
            assert torch.allclose(t(x), x - x.mean(-1, keepdim=True), atol=1e-4)  # pure centering
    ids = torch.randint(0, 64, (1, 8))
    assert torch.isfinite(tgt(ids).logits).all()


def test_target_built_with_different_epsilon_gets_the_sources():
    src = gpt2(layer_norm_epsilon=1e-3)
    tgt = HybridGPT2LMHeadModel(hybrid_config_from(gpt2().config, "retention"))
    report = transfer_shared_weights(src, tgt, ["norms"])
    assert tgt.transformer.ln_f.eps == 1e-3 and tgt.config.layer_norm_epsilon == 1e-3
    assert any("epsilon" in n for n in report.notes)
