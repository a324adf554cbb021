"""Attention -> Mamba-2 transfer (Mamba-in-the-Llama: V -> x, K -> B, Q -> C, O -> out_proj) from every family,
each copied tensor against a slicing of the source written here: GPT-2's Conv1D columns, GPT-NeoX's per-head
interleaved rows, Llama's separate projections with 2 K/V heads for 4 query heads (kept at 2 groups, or
repeated when the mixer takes one group per head)."""

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.families import family_of, get_module
from surgery.xatl.hybrid.cache import CACHE_ARG
from surgery.xatl.transfer.weights import transfer_shared_weights
from xatl_models import D, KINDS, attn, source_and_hybrid


def source_qkv(src, kind: str, layer: int) -> dict[str, tuple]:
    """{"q", "k", "v": (weight (heads * hd, D), bias or None)} of one source layer, K/V at the source's own heads."""
    a, H = attn(src, layer), src.config.num_attention_heads
    hd = D // H
    if kind == "gpt2":  # Conv1D (in, out): columns [Q | K | V]
        W, b = a.c_attn.weight, a.c_attn.bias
        return {k: (W[:, j * D : (j + 1) * D].T, b[j * D : (j + 1) * D]) for j, k in enumerate("qkv")}
    if kind.startswith("neox"):  # rows per head h: [q_h (hd) | k_h (hd) | v_h (hd)]
        W, b = a.query_key_value.weight, a.query_key_value.bias
        per_head = W.view(H, 3, hd, D), b.view(H, 3, hd)
        return {k: (per_head[0][:, j].reshape(D, D), per_head[1][:, j].reshape(D)) for j, k in enumerate("qkv")}
    return {"q": (a.q_proj.weight, None), "k": (a.k_proj.weight, None), "v": (a.v_proj.weight, None)}


def _n_kv(src) -> int:
    return getattr(src.config, "num_key_value_heads", None) or src.config.num_attention_heads


@pytest.mark.parametrize("kind", KINDS)
def test_q_k_v_o_land_in_c_b_x_out_proj(kind):
    src = source_and_hybrid(kind, "mamba2", options={})[0]
    n_kv = _n_kv(src)
    _, hyb = source_and_hybrid(kind, "mamba2", options={"n_kv_head": n_kv})
    report = transfer_shared_weights(src, hyb, ["attn_out", "qkv"])
    fam = family_of(src)
    for i in range(2):
        m, ref = attn(hyb, i).mixer, source_qkv(src, kind, i)
        rows = {k: s for k, (_, s) in m.transfer_slots().items()}
        for key, name in zip("vkq", "xBC"):
            w, b = ref[key]
            assert m.widths[name] == w.shape[0]
            assert torch.equal(m.in_proj.weight[rows[key]], w), (i, key)
            assert torch.equal(m.in_proj.bias[rows[key]], b if b is not None else torch.zeros(w.shape[0]))
        o = get_module(get_module(src, fam.blocks)[i], fam.attn_out)
        assert torch.equal(m.out_proj.weight, o.weight.T if kind == "gpt2" else o.weight)
    assert not any("repeated" in c["note"] for c in report.copied)  # K/V at the source's own heads


def test_grouped_kv_repeated_when_the_mixer_has_a_group_per_head():
    src, hyb = source_and_hybrid("llama", "mamba2", options={})  # n_kv_head defaults to the 4 query heads
    report = transfer_shared_weights(src, hyb, ["qkv"])
    m, ref = attn(hyb, 0).mixer, source_qkv(src, "llama", 0)
    rows = {k: s for k, (_, s) in m.transfer_slots().items()}
    hd = D // 4
    for key in "kv":
        w = ref[key][0]  # 2 heads: head h of the mixer gets source K/V head h // 2
        expected = torch.cat([w[(h // 2) * hd : (h // 2 + 1) * hd] for h in range(4)])
        assert torch.equal(m.in_proj.weight[rows[key]], expected)
    assert any("2 KV heads repeated x2 for 4 query heads" in c["note"] for c in report.copied)


def test_gpt2_hybrid_with_windowed_mamba2_starts_as_its_source():
    """Every block a mamba2 mixer with a window covering the input, all weights transferred: the hybrid computes
    the source GPT-2 (absolute positions, so the window is exact attention) to float32 rounding."""
    T = 12
    src, hyb = source_and_hybrid("gpt2", "mamba2", options={"window": T})
    transfer_shared_weights(src, hyb, ["embeddings", "norms", "mlp", "lm_head", "attn_out", "qkv"])
    ids = torch.randint(0, src.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = src.eval()(ids).logits, hyb(ids).logits
    assert ref.abs().max() > 0.1 and (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("mixer", ["mamba2", "gla"])
@pytest.mark.parametrize("kind", ["neox", "neox_seq", "llama"])  # rotary on 1/4, 1/2 and all of each head
def test_rotary_hybrid_with_a_window_starts_as_its_source_when_the_window_is_rotated(kind, mixer):
    """With `window_rotary` the window's Q/K are rotated by the position embeddings the decoder layer hands
    attention: with the window covering the input and all weights transferred, the hybrid computes its rotary
    source to float32 rounding, in one forward and token by token through the cache; without it, it does not."""
    T = 12
    src = source_and_hybrid(kind, "mamba2", options={})[0]
    opts = {"window": T, **({"n_kv_head": _n_kv(src)} if mixer == "mamba2" else {"key_dim": D})}
    ids = torch.randint(0, src.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = src.eval()(ids).logits
        for rotary in (True, False):
            _, hyb = source_and_hybrid(kind, mixer, options={**opts, "window_rotary": rotary})
            transfer_shared_weights(src, hyb, ["embeddings", "norms", "mlp", "lm_head", "attn_out", "qkv"])
            out = hyb(ids).logits
            if not rotary:
                assert (out - ref).abs().max() > 1e-3  # ten times the tolerance below
                continue
            assert ref.abs().max() > 0.1 and (out - ref).abs().max() < 1e-4
            first = hyb(ids[:, :5], use_cache=True)
            steps, cache = [first.logits], first[CACHE_ARG]
            for t in range(5, T):
                step = hyb(ids[:, t : t + 1], cache=cache, use_cache=True)
                steps.append(step.logits)
                cache = step[CACHE_ARG]
            assert (torch.cat(steps, 1) - ref).abs().max() < 1e-4


def test_a_rotated_window_without_rotary_embeddings_is_refused():
    src, hyb = source_and_hybrid("gpt2", "mamba2", options={"window": 4, "window_rotary": True})
    with pytest.raises(SurgeryError, match=r"no rotary position embeddings reached the mixer .* set window_rotary: false"):
        hyb(torch.zeros(1, 6, dtype=torch.long))


def test_kv_groups_that_do_not_fit_the_source_are_refused():
    src, hyb = source_and_hybrid("llama", "mamba2", options={"n_kv_head": 1})
    with pytest.raises(SurgeryError, match=r"^model\.layers\.0: the target groups keys/values in 1 heads, the source "
                                           r"has 2 K/V heads and 4 query heads: give the mixer n_kv_head=2 \(or 4\)$"):
        transfer_shared_weights(src, hyb, ["qkv"])


def test_alignment_hands_a_rotated_window_the_sources_position_embeddings():
    """Stage 1 runs each mixer on what the source's attention read: a rotated window covering the input, given
    the source's Q/K/V/O, reproduces the source attention there (loss ~0), which it could not without the
    rotary embeddings the aligner passes on."""
    from surgery.training.distill import Teacher
    from surgery.xatl.training.align import AttentionAligner

    src = source_and_hybrid("llama", "mamba2", options={})[0]
    _, hyb = source_and_hybrid("llama", "mamba2", options={"window": 16, "n_kv_head": 2, "window_rotary": True})
    transfer_shared_weights(src, hyb, ["attn_out", "qkv"])
    ids = torch.randint(0, src.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, _ = AttentionAligner(Teacher(src.eval()), hyb.mixer_layers(), "normalized_mse")(hyb, ids)
    assert loss.item() < 1e-8
    for layer in hyb.mixer_layers():
        attn(hyb, layer).mixer.window_rotary = False
    loss, _ = AttentionAligner(Teacher(src), hyb.mixer_layers(), "normalized_mse")(hyb, ids)
    assert loss.item() > 1e-5  # a thousand times the bound above
