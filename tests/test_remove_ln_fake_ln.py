"""The fake LayerNorm, the split Q/K and V input, and preparing a GPT-2 for removal."""

import pytest
import torch
import torch.nn.functional as F

from surgery.errors import SurgeryError
from surgery.families import GPT2, GPT_NEOX
from surgery.remove_ln.fake_ln import SwitchableLayerNorm, TokenContext, per_token_std
from surgery.remove_ln.points import find_points, prepare_for_removal, token_context
from surgery.remove_ln.split_input import AttnInputNorms, SplitQKVInput
from remove_ln_models import tiny_gpt2, tiny_model


def gpt2_split(model, block, qk, v) -> SplitQKVInput:
    return SplitQKVInput(block.attn.c_attn, AttnInputNorms(qk, v), GPT2.value_outputs(model.config))


def layernorm(d: int = 16, seed: int = 0) -> torch.nn.LayerNorm:
    torch.manual_seed(seed)
    ln = torch.nn.LayerNorm(d)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(d))
        ln.bias.copy_(torch.randn(d))
    return ln


def test_prepare_for_removal_keeps_every_logit():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 20))
    before = model(ids).logits
    points = prepare_for_removal(model)
    assert sorted(points) == sorted(["h.0.ln_2", "h.1.ln_2", "h.0.ln_1_qk", "h.1.ln_1_qk", "h.0.ln_1_v", "h.1.ln_1_v", "ln_f"])
    assert (model(ids).logits - before).abs().max() < 1e-5
    assert find_points(model) == points


def test_fake_ln_divides_by_the_fixed_sigma():
    ln = SwitchableLayerNorm(layernorm())
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 10, 5)[None, :, None]
    ln.go_fake(sigma=2.5)
    expected = (x - x.mean(-1, keepdim=True)) / 2.5 * ln.weight + ln.bias
    assert torch.allclose(ln(x), expected, atol=1e-5)


def test_fake_equals_real_scaled_by_each_tokens_std_over_sigma():
    """fake(x) - b = (real(x) - b) * std_token / sigma: the swap error is exactly the std's spread."""
    base = layernorm()
    real, fake = SwitchableLayerNorm(base), SwitchableLayerNorm(base)
    x = torch.randn(2, 7, 16) * torch.logspace(-1, 2, 7)[None, :, None]
    fake.go_fake(sigma=3.0)
    std = per_token_std(x, base.eps).unsqueeze(-1)
    assert torch.allclose(fake(x) - base.bias, (real(x) - base.bias) * std / 3.0, rtol=1e-4, atol=1e-5)
    x_const = x / x.std(-1, unbiased=False, keepdim=True) * 3.0  # every token at std 3: fake == real up to eps
    assert (fake(x_const) - real(x_const)).abs().max() < 1e-4


def test_moving_average_excludes_first_and_end_of_text_positions():
    context = TokenContext()
    ln = SwitchableLayerNorm(layernorm(), context, momentum=0.9)
    ln.train()

    def batch(std_rest: float, std_first: float, std_eot: float) -> torch.Tensor:
        x = torch.randn(2, 6, 16)
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
        scale = torch.full((2, 6, 1), std_rest)
        scale[:, 0], scale[:, 3] = std_first, std_eot
        return x * scale

    eot = torch.zeros(2, 6, dtype=torch.bool)
    eot[:, 3] = True
    context.eot_mask = eot
    ln(batch(2.0, 50.0, 7.0))
    ln(batch(4.0, 60.0, 9.0))
    assert int(ln.avg_count) == 0  # recorded, not yet folded
    context.flush()
    assert float(ln.avg_std) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0, rel=1e-4)
    assert float(ln.avg_std_first) == pytest.approx(0.9 * 50 + 0.1 * 60, rel=1e-4)
    assert float(ln.avg_std_eot) == pytest.approx(0.9 * 7 + 0.1 * 9, rel=1e-4)
    assert int(ln.avg_count) == 2
    ln.eval()
    ln(batch(100.0, 100.0, 100.0))  # evaluation forwards do not move the averages
    assert int(ln.avg_count) == 2

    ln.go_fake(special_first=True, special_eot=True)
    assert float(ln.sigma) == pytest.approx(2.2, rel=1e-4)
    x = batch(1.0, 1.0, 1.0)
    out = ln(x)
    centered = x - x.mean(-1, keepdim=True)
    for pos, sigma in ((0, 51.0), (3, 7.2), (1, 2.2)):
        assert torch.allclose(out[:, pos], centered[:, pos] / sigma * ln.weight + ln.bias, atol=1e-5)
    ln.drop_specials(first=True, eot=True)
    assert torch.allclose(ln(x), centered / 2.2 * ln.weight + ln.bias, atol=1e-5)


def test_going_fake_before_any_measurement_is_refused():
    ln = SwitchableLayerNorm(layernorm()).eval()
    ln(torch.randn(2, 5, ln.weight.shape[0]))  # an eval-mode forward measures nothing
    with pytest.raises(RuntimeError, match=r"no std measured yet: .*training mode; call model.train\(\)"):
        ln.go_fake()


def test_split_qkv_input_reads_through_separate_norms():
    model = tiny_gpt2()
    block = model.transformer.h[0]
    x = torch.randn(2, 9, 32)
    reference = block.attn.c_attn(block.ln_1(x))
    qk, v = SwitchableLayerNorm(block.ln_1), SwitchableLayerNorm(block.ln_1)
    split = gpt2_split(model, block, qk, v)
    assert torch.allclose(split(x), reference, atol=1e-5)
    with torch.no_grad():
        v.bias.add_(1.0)  # moving the value path's LN changes only the value columns
    out = split(x)
    assert torch.allclose(out[..., :64], reference[..., :64], atol=1e-5)
    assert not torch.allclose(out[..., 64:], reference[..., 64:], atol=1e-3)


def test_preparing_twice_names_the_prepared_module():
    model = tiny_gpt2()
    prepare_for_removal(model)
    with pytest.raises(SurgeryError, match=r"transformer\.h\.0\.ln_1 is already prepared for removal"):
        prepare_for_removal(model)


def test_an_undescribed_model_type_is_refused_naming_the_supported_ones():
    model = tiny_gpt2()
    model.config.model_type = "bloom"
    with pytest.raises(SurgeryError, match="model type 'bloom' is not supported .*gemma3_text, .*olmo2, .*qwen3.*add a Family entry"):
        prepare_for_removal(model)


def test_all_points_share_one_token_context():
    points = prepare_for_removal(tiny_gpt2())
    context = token_context(points)
    assert all(ln.context is context for ln in points.values())


def test_loading_a_state_dict_switches_the_forward_pass():
    """The forward pass follows the loaded buffers (fake, special sigmas), not the state it was built in."""
    base = layernorm()
    done, fresh = SwitchableLayerNorm(base), SwitchableLayerNorm(base)
    done.go_fake(sigma=1.7, special_first=True)
    x = torch.randn(2, 5, 16) * 4
    assert not torch.allclose(fresh(x), done(x), atol=1e-3)
    fresh.load_state_dict(done.state_dict())
    assert fresh.is_fake and fresh.has_specials
    assert torch.equal(fresh(x), done(x))


def test_split_input_measures_both_paths_in_one_pass():
    """While both attention-input LNs are real they read one standardized input, and both average the
    same per-token std (first position and EOT tokens kept apart)."""
    model = tiny_gpt2()
    block = model.transformer.h[0]
    context = TokenContext()
    qk, v = SwitchableLayerNorm(block.ln_1, context), SwitchableLayerNorm(block.ln_1, context)
    split = gpt2_split(model, block, qk, v).train()
    x = torch.randn(2, 9, 32) * torch.linspace(0.5, 3, 9)[None, :, None]
    eot = torch.zeros(2, 9, dtype=torch.bool)
    eot[1, 4] = True
    context.eot_mask = eot
    assert torch.allclose(split(x), block.attn.c_attn(block.ln_1(x)), atol=1e-5)
    context.flush()
    std = per_token_std(x, block.ln_1.eps)
    rest = torch.ones(2, 9, dtype=torch.bool)
    rest[:, 0], rest[1, 4] = False, False
    for ln in (qk, v):
        assert float(ln.avg_std) == pytest.approx(float(std[rest].mean()), rel=1e-5)
        assert float(ln.avg_std_first) == pytest.approx(float(std[:, 0].mean()), rel=1e-5)
        assert float(ln.avg_std_eot) == pytest.approx(float(std[1, 4]), rel=1e-5)
        assert int(ln.avg_count) == 1


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("state", ["real", "fake", "mixed", "mixed_v", "mixed_special", "fake_special"])
@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_split_input_folded_matmul_matches_two_norms_values_and_gradients(state, fold, kind):
    """Whichever path SplitQKVInput takes (one folded matmul or two), its outputs and every gradient equal
    those of LN_qk(x) W + b on the query/key outputs and LN_v(x) W + b on the value outputs, computed
    separately: GPT-2's [q|k|v] Conv1D and GPT-NeoX's per-head interleaved Linear."""
    model = tiny_model(kind)
    fam = GPT2 if kind == "gpt2" else GPT_NEOX
    block = model.get_submodule(fam.blocks)[0]
    proj, norm = block.get_submodule(fam.qkv[0]), block.get_submodule(fam.attn_norm)
    qk, v = SwitchableLayerNorm(norm), SwitchableLayerNorm(norm)
    torch.manual_seed(1)
    with torch.no_grad():
        for ln in (qk, v):
            ln.weight.add_(torch.randn(32) * 0.3)
            ln.bias.add_(torch.randn(32) * 0.3)
    if state not in ("real", "mixed_v"):
        qk.go_fake(sigma=1.3, special_first=state in ("fake_special", "mixed_special"))
    if state in ("fake", "fake_special", "mixed_v"):
        v.go_fake(sigma=0.7, special_first=state == "mixed_v")
    for ln in (qk, v):  # the first position's own sigma, where kept, differs from the others'
        ln.sigma_first.fill_(2.1)
    mask = fam.value_outputs(model.config)
    split = SplitQKVInput(proj, AttnInputNorms(qk, v), mask).eval()
    split.fold_min_tokens = 0 if fold else 10**9
    x = torch.randn(2, 9, 32) * 2
    r = torch.randn(2, 9, 96)
    params = [proj.weight, proj.bias, qk.weight, qk.bias, v.weight, v.bias]

    def grads(out):
        return torch.autograd.grad((out * r).sum(), params)

    out = split(x)
    ref = torch.where(mask, proj(v(x)), proj(qk(x)))
    assert torch.allclose(out, ref, atol=1e-5)
    for g, g_ref in zip(grads(split(x)), grads(ref)):
        assert torch.allclose(g, g_ref, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_split_input_folded_mixed_state_measures_the_real_copy_like_a_real_norm(kind):
    """Training with Q/K fake and V real, the folded path records for ln_v the same per-token std (first
    position kept apart) as a real LayerNorm on the same input, and nothing for the fake copy."""
    model = tiny_model(kind)
    fam = GPT2 if kind == "gpt2" else GPT_NEOX
    block = model.get_submodule(fam.blocks)[0]
    proj, norm = block.get_submodule(fam.qkv[0]), block.get_submodule(fam.attn_norm)
    context = TokenContext()
    qk, v = SwitchableLayerNorm(norm, context), SwitchableLayerNorm(norm, context)
    qk.go_fake(sigma=1.3)
    split = SplitQKVInput(proj, AttnInputNorms(qk, v), fam.value_outputs(model.config)).train()
    split.fold_min_tokens = 0
    x = torch.randn(3, 7, 32) * torch.linspace(0.5, 4, 7)[None, :, None]
    split(x)
    context.flush()
    std = per_token_std(x, norm.eps)
    assert float(v.avg_std) == pytest.approx(float(std[:, 1:].mean()), rel=1e-5)
    assert float(v.avg_std_first) == pytest.approx(float(std[:, 0].mean()), rel=1e-5)
    assert int(v.avg_count) == 1 and int(qk.avg_count) == 0
