"""The LN-free export: a vanilla GPT2LMHeadModel that computes what the all-fake model computes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.remove_ln.export import SCALE, export_ln_free, marked_ln_free
from remove_ln_models import all_fake, tiny_gpt2
from surgery.remove_ln.points import prepare_for_removal


def test_export_logits_equal_the_fake_ln_model(tmp_path):
    model, points = all_fake()
    with torch.no_grad():  # training moves the fake LNs' affines away from the real ones; so do we
        for ln in points.values():
            ln.weight.mul_(1.5)
            ln.bias.add_(0.2)
    ids = torch.randint(0, 64, (3, 40))
    reference = model(ids).logits
    exported = export_ln_free(model)
    logits = exported(ids).logits
    assert ((logits - reference).abs().max() / reference.abs().max()) < 1e-4
    assert marked_ln_free(exported) and not marked_ln_free(tiny_gpt2())
    exported.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers, no surgery code
    assert reloaded.config.surgery_ln_free == {"scale": SCALE}
    assert (reloaded(ids).logits - logits).abs().max() < 1e-5


@pytest.mark.parametrize("std", [1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3])
def test_exported_block_norms_only_center(std):
    model, _ = all_fake()
    ln = export_ln_free(model).transformer.h[1].ln_2
    x = torch.randn(4, 32, dtype=torch.float64) * std + 5 * std
    out = torch.nn.functional.layer_norm(x, (32,), ln.weight.double(), ln.bias.double(), ln.eps)
    centered = x - x.mean(-1, keepdim=True)
    assert ((out - centered).abs().max() / centered.abs().max()).item() < 1e-5


def test_exported_block_norms_have_no_per_token_scale_in_float32():
    model, _ = all_fake()
    block = export_ln_free(model).transformer.h[0]
    x = torch.randn(6, 32) * torch.logspace(-2, 3, 6)[:, None]
    centered = x - x.mean(-1, keepdim=True)
    for ln in (block.ln_1, block.ln_2):
        assert torch.allclose(ln(x), centered, rtol=1e-5, atol=1e-6 * centered.abs().max().item())


def test_export_refuses_real_or_special_norms():
    model = tiny_gpt2()
    points = prepare_for_removal(model)
    model.train()
    model(torch.randint(0, 64, (2, 16)))
    for name, ln in points.items():
        if name != "ln_f":
            ln.go_fake()
    with pytest.raises(SurgeryError, match=r"1 norm\(s\) are still real.*ln_f.*raise trainer.max_steps"):
        export_ln_free(model)
    points["ln_f"].go_fake(special_first=True)
    with pytest.raises(SurgeryError, match="special"):
        export_ln_free(model)
    points["ln_f"].drop_specials(first=True)
    assert marked_ln_free(export_ln_free(model))


def test_export_of_an_unprepared_model_is_refused():
    with pytest.raises(SurgeryError, match=r"not prepared for norm removal \(transformer.h.0.ln_1 is a LayerNorm\); call prepare_for_removal first"):
        export_ln_free(tiny_gpt2())


def test_transformer_lens_finds_no_per_token_scale_in_the_export():
    from surgery.lens.checks import verify_ln_free

    model, _ = all_fake()
    result = verify_ln_free(export_ln_free(model))  # raises naming any failed criterion
    assert result["has_normalization"] is False
    assert result["hf_tl_relative_logit_diff"] < 1e-5 and result["dla_relative_error"] < 1e-5
