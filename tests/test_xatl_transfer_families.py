"""Transfer from every family: shared tensors equal the source's; Q/K/V into the mixers against expansions
written here (GPT-NeoX de-interleaved, Llama's grouped KV heads repeated); kept attention copied whole."""

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv

from surgery.errors import SurgeryError
from surgery.families import family_of, get_module
from surgery.xatl import hybrid_config_from, hybrid_model
from surgery.xatl.hybrid.cache import CACHE_ARG
from surgery.xatl.transfer.weights import COMPONENTS, transfer_shared_weights
from remove_ln_models import tiny_model
from xatl_models import D, KINDS, attn, source_and_hybrid



def expected_qkv(src, kind: str, layer: int) -> dict[str, tuple]:
    """Q, K, V weights (H * hd, d) and biases of one source layer, written out head by head."""
    a, H = attn(src, layer), src.config.num_attention_heads
    hd = D // H
    if kind == "gpt2":  # Conv1D (in, out), columns [Q | K | V]
        W, b = a.c_attn.weight.T, a.c_attn.bias
        return {k: (W[j * D : (j + 1) * D], b[j * D : (j + 1) * D]) for j, k in enumerate("qkv")}
    if kind.startswith("neox"):  # rows [q_h | k_h | v_h] for h = 0..H-1
        W, b = a.query_key_value.weight, a.query_key_value.bias
        rows = {k: [r for h in range(H) for r in range(h * 3 * hd + j * hd, h * 3 * hd + (j + 1) * hd)]
                for j, k in enumerate("qkv")}
        return {k: (W[r], b[r]) for k, r in rows.items()}
    n_kv = src.config.num_key_value_heads
    group = H // n_kv  # query head h reads KV head h // group

    def expand(w):
        return torch.cat([w[(h // group) * hd : (h // group + 1) * hd] for h in range(H)])

    return {"q": (a.q_proj.weight, None), "k": (expand(a.k_proj.weight), None), "v": (expand(a.v_proj.weight), None)}


@pytest.mark.parametrize("kind", KINDS)
def test_every_component_equals_the_sources(kind):
    """All components, attention kept at layer 1: every source tensor outside layer 0's attention is in the
    hybrid under its own name, bit for bit; layer 0's W_O and Q/K/V are in its mixer."""
    src, hyb = source_and_hybrid(kind, "gla", [1])
    report = transfer_shared_weights(src, hyb, COMPONENTS)
    fam, s, t = family_of(src), dict(src.named_parameters()), dict(hyb.named_parameters())
    shared = [n for n in s if f"{fam.blocks}.0.{fam.attn}." not in n]
    for name in shared:
        assert torch.equal(t[name], s[name]), name
    assert set(shared) <= set(report.parameter_names)
    m = attn(hyb, 0).mixer
    o = get_module(get_module(src, fam.blocks)[0], fam.attn_out)
    assert torch.equal(m.out_proj.weight, o.weight.T if kind == "gpt2" else o.weight)
    for key, (w, b) in expected_qkv(src, kind, 0).items():
        lin = getattr(m, f"{key}_proj")
        assert torch.equal(lin.weight, w), key
        assert torch.equal(lin.bias, b) if b is not None else torch.equal(lin.bias, torch.zeros(D))
    if kind == "llama":
        assert any("2 KV heads repeated x2 for 4 query heads" in c["note"] for c in report.copied)
    if kind.startswith("neox"):
        assert any("de-interleaved" in c["note"] for c in report.copied)


@pytest.mark.parametrize("kind", KINDS)
def test_mamba_in_the_llama_mapping(kind):
    """V -> x (in_proj rows :E), K -> B, Q -> C (x_proj rows after the dt rank), with E = N = d."""
    src, hyb = source_and_hybrid(kind, "mamba")
    transfer_shared_weights(src, hyb, ["attn_out", "qkv"])
    for i in range(2):
        m, qkv = attn(hyb, i).mixer, expected_qkv(src, kind, i)
        assert torch.equal(m.in_proj.weight[:D], qkv["v"][0])
        assert torch.equal(m.x_proj.weight[4 : 4 + D], qkv["k"][0])
        assert torch.equal(m.x_proj.weight[4 + D :], qkv["q"][0])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_v_alone_into_a_mamba_whose_state_is_too_small_for_k_and_q(kind):
    """d_state 8 < d: "qkv" is refused by the shapes, "v" copies V -> x and leaves x_proj as it was."""
    src, hyb = source_and_hybrid(kind, "mamba", options={"d_state": 8, "expand": 1, "d_conv": 4})
    x_proj = attn(hyb, 0).mixer.x_proj.weight.detach().clone()
    with pytest.raises(SurgeryError, match="shapes do not allow this mapping"):
        transfer_shared_weights(src, hyb, ["qkv"])
    src, hyb = source_and_hybrid(kind, "mamba", options={"d_state": 8, "expand": 1, "d_conv": 4})
    report = transfer_shared_weights(src, hyb, ["v"])
    for i in range(2):
        assert torch.equal(attn(hyb, i).mixer.in_proj.weight[:D], expected_qkv(src, kind, i)["v"][0])
    assert torch.equal(attn(hyb, 0).mixer.x_proj.weight, x_proj)
    assert {c["target"].rsplit(".", 1)[0].rsplit(".", 1)[-1] for c in report.copied} == {"in_proj"}


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_mixer_projections_compute_the_sources_per_head_queries_keys_values(kind):
    """Functional check with the source's own code paths: GPT-NeoX splits its fused output per head into
    q, k, v; Llama repeats KV heads with transformers' `repeat_kv`. The mixer's projections give the same
    per-head tensors (before rotary, which mixers do not use)."""
    src, hyb = source_and_hybrid(kind, "retention")
    transfer_shared_weights(src, hyb, ["qkv"])
    a, m, H, x = attn(src, 1), attn(hyb, 1).mixer, 4, torch.randn(2, 5, D)
    heads = lambda t: t.view(2, 5, -1, D // H).transpose(1, 2)  # noqa: E731  (B, heads, T, hd)
    with torch.no_grad():
        if kind == "neox":
            ref = dict(zip("qkv", a.query_key_value(x).view(2, 5, H, 3 * D // H).transpose(1, 2).chunk(3, dim=-1)))
        else:
            ref = {"q": heads(a.q_proj(x)), "k": repeat_kv(heads(a.k_proj(x)), 2), "v": repeat_kv(heads(a.v_proj(x)), 2)}
        for key in "qkv":
            torch.testing.assert_close(heads(getattr(m, f"{key}_proj")(x)), ref[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_hybrid_keeping_every_attention_layer_computes_the_source(kind):
    """Attention kept everywhere and everything transferred: the hybrid is the source (rotary, grouped KV
    heads, parallel residual and all), also when decoding through its cache."""
    src, hyb = source_and_hybrid(kind, "gla", [0, 1])
    transfer_shared_weights(src, hyb)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src(ids).logits
        torch.testing.assert_close(hyb(ids, use_cache=False).logits, ref, rtol=0, atol=1e-5)
        out = hyb(ids[:, :12], use_cache=True)
        steps = [out.logits]
        for t in range(12, 20):
            out = hyb(ids[:, t : t + 1], use_cache=True, **{CACHE_ARG: out[CACHE_ARG]})
            steps.append(out.logits)
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_errors_and_norm_epsilon():
    src = tiny_model("gpt2")
    _, llama_hybrid = source_and_hybrid("llama", "gla")
    with pytest.raises(SurgeryError, match="cannot transfer from a gpt2 model into a hybrid_llama one"):
        transfer_shared_weights(src, llama_hybrid)
    llama = tiny_model("llama")
    llama.config.rms_norm_eps = 1e-3
    for mod in llama.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 1e-3
    report = transfer_shared_weights(llama, llama_hybrid, ["norms"])
    assert llama_hybrid.config.rms_norm_eps == 1e-3 and any("epsilon" in n for n in report.notes)
    assert all(m.variance_epsilon == 1e-3 for m in llama_hybrid.modules() if hasattr(m, "variance_epsilon"))
    narrow = hybrid_model(hybrid_config_from(llama.config, "gla", {"key_dim": 16}))
    with pytest.raises(SurgeryError, match=r"cannot copy model\.layers\.0\.self_attn\.q_proj \(32, 32\) into "
                                           r".*q_proj\.weight \(16, 32\).*GLAMixer"):
        transfer_shared_weights(llama, narrow, ["qkv"])
