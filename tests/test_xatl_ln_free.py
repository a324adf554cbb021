"""Transfer from a real LN-free export (surgery.remove_ln: prepare -> every LN fake -> export_ln_free) into a
hybrid: the hybrid's LNs compute what the fake LNs left behind (pure centering in the blocks, a fixed-scale
affine at ln_f), and the transferred MLPs and Q/K/V read the same numbers as in the LN-removed model.

Tolerances: the export's large-eps centering has relative error var / 2e12 (~1e-11 here), so differences are
fp32 rounding of order-1 activations: 1e-5 per LN, 1e-4 after a projection or a whole model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from surgery.remove_ln import export_ln_free, marked_ln_free, prepare_for_removal
from surgery.xatl import HybridGPT2LMHeadModel, hybrid_config_from
from surgery.xatl.transfer.weights import transfer_shared_weights



@pytest.fixture(scope="module")
def removed():
    """(LN-removed model with every point fake, its points, the LN-free export)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    with torch.no_grad():  # trained-looking LN affines, so that folding them is not a no-op
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():  # training forwards measure each LN's mean per-token std
        for _ in range(3):
            model(torch.randint(0, 64, (4, 16)))
    for ln in points.values():
        ln.go_fake()
    model.eval()
    return model, points, export_ln_free(model)


def hybrid_from(source, mixer="retention", attn_layers=()):
    torch.manual_seed(3)
    return HybridGPT2LMHeadModel(hybrid_config_from(source.config, mixer, None, list(attn_layers))).eval()


def residual(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, 32, generator=g) * 2 + torch.randn(32, generator=g)  # non-zero mean per token


def test_hybrid_lns_compute_what_the_fake_lns_left(removed):
    model, points, export = removed
    assert marked_ln_free(export)
    tgt = hybrid_from(export)
    report = transfer_shared_weights(export, tgt, ["embeddings", "norms", "mlp", "lm_head", "attn_out", "qkv"])
    assert marked_ln_free(tgt) and tgt.config.layer_norm_epsilon == export.config.layer_norm_epsilon == 1e12
    assert any("LN-free" in n for n in report.notes)
    x = residual(0)
    centered = x - x.mean(-1, keepdim=True)
    for i, block in enumerate(tgt.transformer.h):
        for ln in (block.ln_1, block.ln_2):
            assert ln.eps == 1e12 and torch.all(ln.weight == 1e6) and torch.all(ln.bias == 0)
            assert (ln(x) - centered).abs().max() < 1e-5
        # the MLP reads, through centering + the folded c_fc, what it read through the fake ln_2
        assert (block.mlp(block.ln_2(x)) - model.transformer.h[i].mlp(points[f"h.{i}.ln_2"](x))).abs().max() < 1e-4
        # Q/K/V went into the retention mixer with the ln_1 affines folded in
        qkv = model.transformer.h[i].attn.c_attn(x)  # SplitQKVInput: (…, 3d) through both fake ln_1 copies
        mixer, h = block.attn.mixer, block.ln_1(x)
        for j, proj in enumerate((mixer.q_proj, mixer.k_proj, mixer.v_proj)):
            assert (proj(h) - qkv[..., j * 32 : (j + 1) * 32]).abs().max() < 1e-4
    ln_f = tgt.transformer.ln_f  # fixed-scale affine: no per-token division left
    assert (ln_f(x) - points["ln_f"](x)).abs().max() < 1e-4
    assert (ln_f(x * 3) - points["ln_f"](x * 3)).abs().max() < 1e-4


def test_attention_kept_everywhere_reproduces_the_ln_removed_model(removed, tmp_path):
    """A hybrid that keeps every attention layer (copied whole) is the export itself: same logits as the
    LN-removed model, and it saves and loads as an LN-free hybrid."""
    model, _, export = removed
    tgt = hybrid_from(export, attn_layers=[0, 1])
    transfer_shared_weights(export, tgt)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        assert (export(ids).logits - ref).abs().max() < 1e-4
        assert (tgt(ids, use_cache=False).logits - ref).abs().max() < 1e-4
    tgt.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert marked_ln_free(loaded) and loaded.config.surgery_ln_free == {"scale": 1e6}
    assert loaded.transformer.h[0].ln_1.eps == 1e12
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, tgt(ids, use_cache=False).logits)


@pytest.mark.parametrize("mixer", ["mamba", "gla"])
def test_ln_free_linear_cost_model_runs_and_generates(removed, mixer):
    _, _, export = removed
    tgt = hybrid_from(export, mixer)
    transfer_shared_weights(export, tgt)
    assert all(torch.equal(tgt.transformer.h[i].mlp.c_fc.weight, export.transformer.h[i].mlp.c_fc.weight)
               for i in range(2))
    prompt = torch.randint(0, 64, (1, 5))
    out = tgt.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, tgt(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
