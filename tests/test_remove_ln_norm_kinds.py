"""Norm removal for the norm kinds beyond pre-norms (Qwen3's per-head QK-norm, Gemma 3's sandwich norms with their
`(1 + weight)` gain, OLMo 2's post-norms and whole-projection QK-norm), against transformers' own modules, with
randomized parameters (tests/norm_family_models.py).

Tolerances: fp32 throughout. A prepared model computes the original's logits to 1e-5 relative (the same reductions in
another order). A fake norm frozen at the measured scale of inputs whose scale is constant equals the real norm to
1e-5 relative (the real one adds eps=1e-6 to a mean square of ~1). The export computes the trained fake model's
logits to 1e-5 relative: folding rounds once per weight (~1e-7), and a neutralised norm's own error is
mean(x^2) / (2 * 1e12) (~1e-12 here).
"""

import json
import subprocess
import sys

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from norm_family_models import KINDS, random_tokens, tiny_norm_family
from surgery.errors import SurgeryError
from surgery.families import family_of, is_norm, norm_eps, norm_paths, set_norm_eps
from surgery.models.ln_free import detect_ln_free, scan_norms
from surgery.remove_ln.export import SCALE, export_ln_free
from surgery.remove_ln.fake_ln import SwitchableLayerNorm
from surgery.remove_ln.head_norm import SwitchableHeadNorm
from surgery.remove_ln.points import family_kinds, prepare_for_removal, token_context
from surgery.remove_ln.schedule import RemovalSchedule

ROLES = {"qwen3": {"attn_in", "q", "k", "mlp_in"}, "olmo2": {"q", "k", "attn_out", "mlp_out"},
         "gemma3": {"attn_in", "q", "k", "attn_out", "mlp_in", "mlp_out"}}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def measured(kind: str, seed: int = 0):
    """(model prepared, every point measured on training forwards, points); nothing fake yet."""
    model = tiny_norm_family(kind, seed)
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(random_tokens(4, 24, seed=s))
            token_context(points).flush()
    return model, points


def trained_fake(kind: str, seed: int = 0):
    """Every point fake, then three SGD steps, so the exported weights are not the initial ones."""
    model, points = measured(kind, seed)
    for ln in points.values():
        ln.go_fake()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # small: an LN-free OLMo 2 diverges at 0.05
    for s in range(3):
        ids = random_tokens(4, 16, seed=10 + s)
        model(ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    return model.eval(), points


@pytest.mark.parametrize("kind", KINDS)
def test_the_family_describes_every_norm_transformers_builds(kind):
    model = tiny_norm_family(kind)
    fam = family_of(model)
    assert set(fam.block_norms()) == ROLES[kind]
    assert sorted(n for n, m in model.named_modules() if is_norm(m)) == sorted(norm_paths(model))
    assert type(model).__name__ == fam.hf_architecture


@pytest.mark.parametrize("kind", KINDS)
def test_preparing_changes_no_logit_and_names_a_point_per_norm(kind):
    model = tiny_norm_family(kind)
    ids = random_tokens()
    with torch.no_grad():
        before = model(ids).logits
        points = prepare_for_removal(model)
        after = model(ids).logits
    assert rel(after, before) < 1e-5
    kinds = family_kinds(family_of(model))
    assert set(points) == {f"h.{i}.{k}" for i in range(2) for k in kinds if k != "ln_f"} | {"ln_f"}
    per_head = [n for n, p in points.items() if isinstance(p, SwitchableHeadNorm)]
    assert per_head == ([] if kind == "olmo2" else [f"h.{i}.{k}" for i in range(2) for k in ("ln_q", "ln_k")])


@pytest.mark.parametrize("source, head_axis, offset", [(Qwen3RMSNorm, -2, 0.0), (Gemma3RMSNorm, -3, 1.0)])
def test_a_fake_per_head_norm_at_swap_equals_the_real_one_on_the_measured_scale(source, head_axis, offset):
    """Heads of constant but different rms (0.5, 1, 2, 4), the first position at 10x: each head's sigma is its own
    measured scale, and with `special_first` the fake norm equals the real one (transformers' module) everywhere."""
    torch.manual_seed(0)
    norm = source(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.3, 3.0).sub_(offset)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0])
    x = torch.randn(3, 5, 4, 8)  # (B, T, H, d_head)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * scales[:, None]
    x[:, 0] *= 10.0
    x = x if head_axis == -2 else x.transpose(1, 2)  # Gemma 3 normalizes (B, H, T, d_head)
    head = SwitchableHeadNorm(norm, 4, head_axis, gain_offset=offset).train()
    real = norm(x)
    assert rel(head(x), real) < 1e-5
    head.context.flush()
    head.go_fake(special_first=True)
    assert torch.allclose(head.sigma, scales, rtol=1e-5) and torch.allclose(head.sigma_first, 10 * scales, rtol=1e-5)
    head.eval()
    assert rel(head(x), real) < 1e-5
    head.drop_specials(first=True)  # the first position now divides by the other tokens' sigma: 10x off there
    first = (slice(None), 0) if head_axis == -2 else (slice(None), slice(None), 0)
    assert rel(head(x)[first], 10 * real[first]) < 1e-5


@pytest.mark.parametrize("source, offset", [(Olmo2RMSNorm, 0.0), (Gemma3RMSNorm, 1.0)])
def test_a_fake_whole_projection_or_post_norm_at_swap_equals_the_real_one(source, offset):
    """OLMo 2's QK-norm over the whole projection and the post-sublayer norms are one norm over the last axis, with
    one sigma; Gemma's gain is (1 + weight)."""
    torch.manual_seed(1)
    norm = source(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.3, 3.0).sub_(offset)
    x = torch.randn(2, 7, 32)
    x = 3.0 * x / x.pow(2).mean(-1, keepdim=True).sqrt()
    fake = SwitchableLayerNorm(norm, gain_offset=offset).train()
    real = norm(x)
    assert rel(fake(x), real) < 1e-5
    fake.context.flush()
    fake.go_fake()
    assert fake.sigma.item() == pytest.approx(3.0, rel=1e-5)
    assert rel(fake.eval()(x), real) < 1e-5


def test_a_per_head_norm_is_an_rmsnorm_with_heads_on_a_known_axis():
    with pytest.raises(ValueError, match="head_axis must be -2 .* or -3"):
        SwitchableHeadNorm(Qwen3RMSNorm(8), 4, head_axis=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_through_every_fake_point(kind):
    model, points = measured(kind)
    for ln in points.values():
        ln.go_fake()
    ids = random_tokens()
    model(ids, labels=ids).loss.backward()
    for name, ln in points.items():
        assert ln.weight.grad is not None and ln.weight.grad.abs().sum() > 0, name
    fam = family_of(model)
    block = model.get_submodule(fam.blocks)[0]
    for path in (*fam.qkv, fam.attn_out, *fam.mlp_in, fam.mlp_out):
        proj = block.get_submodule(path)
        assert getattr(proj, "proj", proj).weight.grad.abs().sum() > 0, path


@pytest.mark.parametrize("kind", KINDS)
def test_export_is_the_vanilla_class_and_folding_is_exact(kind):
    model, _ = trained_fake(kind)
    ids = random_tokens(seed=5)
    with torch.no_grad():
        expected = model(ids).logits
        out = export_ln_free(model)
        got = out(ids).logits
    assert type(out).__name__ == family_of(model).hf_architecture
    assert rel(got, expected) < 1e-5
    norms = [m for m in out.modules() if is_norm(m)]
    assert len(norms) == len(norm_paths(out)) and all(norm_eps(m) == SCALE**2 for m in norms)


@pytest.mark.parametrize("kind", KINDS)
def test_every_norm_left_in_the_export_is_linear_in_its_input(kind):
    """Scaling a norm's input by 1e-2 ... 1e3 scales its output the same, to 1e-5 (RMSNorms have no bias)."""
    out = export_ln_free(trained_fake(kind)[0])
    for name in norm_paths(out):
        norm = out.get_submodule(name)
        x = torch.randn(5, norm.weight.shape[0])
        base = norm(x)
        for c in (1e-2, 1e2, 1e3):
            assert torch.allclose(norm(c * x), c * base, rtol=1e-5, atol=1e-6 * c * base.abs().max().item()), name


@pytest.mark.parametrize("kind", KINDS)
def test_scan_norms_recognizes_the_export_and_refuses_a_half_converted_one(kind):
    out = export_ln_free(trained_fake(kind)[0])
    assert scan_norms(out).kind() == "LN-free" and detect_ln_free(out)
    assert scan_norms(tiny_norm_family(kind)).kind() == "with LN"
    set_norm_eps(out.get_submodule(f"model.layers.1.{family_of(out).qk_norm_paths[0]}"), 1e-6)  # one norm back
    with pytest.raises(SurgeryError, match=r"only partly LN-free: .* still normalize per token: model\.layers\.1\.self_attn\.q_norm"):
        detect_ln_free(out)
    with pytest.raises(SurgeryError, match="already neutralised"):
        prepare_for_removal(out)


@pytest.mark.parametrize("kind", KINDS)
def test_the_default_schedule_removes_every_point_in_kind_order(kind):
    model, points = measured(kind)
    kinds = family_kinds(family_of(model))
    steps = RemovalSchedule(start=3).removal_steps(2, kinds)
    assert set(steps) == set(points) and min(steps.values()) == 3
    order = [name.rsplit(".", 1)[-1] for name in steps]
    assert order == sorted(order, key=kinds.index)  # kinds in order, each block by block
    reordered = RemovalSchedule(order=list(reversed(kinds))).removal_steps(2, kinds)
    assert next(iter(reordered)) == "ln_f"


def test_a_schedule_order_missing_a_kind_of_the_model_is_refused_naming_it():
    kinds = family_kinds(family_of(tiny_norm_family("olmo2")))
    with pytest.raises(SurgeryError, match=r"schedule.order must list each kind .*missing \['ln_mlp_out'\]"):
        RemovalSchedule(order=["ln_q", "ln_k", "ln_attn_out", "ln_f"]).removal_steps(2, kinds)


@pytest.mark.slow
def test_exports_reload_without_surgery_as_their_vanilla_classes(tmp_path):
    """One fresh process (no `surgery` importable) loads the three exports and prints their logits."""
    ids = random_tokens(seed=7)
    expected = {}
    for kind in KINDS:
        model, _ = trained_fake(kind, seed=2)
        export_ln_free(model).save_pretrained(tmp_path / kind)
        with torch.no_grad():
            expected[kind] = (family_of(model).hf_architecture, model(ids).logits)
    script = (
        "import json, sys, torch\n"
        "sys.modules['surgery'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        "out = {}\n"
        f"for kind in {KINDS!r}:\n"
        f"    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + kind).eval()\n"
        f"    with torch.no_grad(): out[kind] = [type(m).__name__, m(torch.tensor({ids.tolist()})).logits.tolist()]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, (cls, logits) in expected.items():
        assert result[kind][0] == cls
        assert rel(torch.tensor(result[kind][1]), logits) < 1e-5


def test_scan_norms_measures_a_removal_in_progress_with_per_head_special_sigmas():
    """Per-head norms fake with their first-position sigmas kept: their scale varies by the largest first/other
    sigma ratio over heads (so they count as normalizing, like every norm still real)."""
    model, points = measured("qwen3")
    for name in ("h.0.ln_q", "h.1.ln_k"):
        points[name].go_fake(special_first=True)
    scan = scan_norms(model)
    assert scan.removal_in_progress and scan.kind() == "with LN"
    q = points["h.0.ln_q"]
    ratio = float((q.sigma_first / q.sigma - 1).abs().max())
    assert ratio > 0 and scan.scale_excess["model.layers.0.self_attn.q_norm"] == pytest.approx(ratio)


def test_loss_jumps_recover_the_rise_at_each_removal_step():
    """A training loss that rises by 0.3, 0.2 and 0.1 at steps 6, 8 and 10 (two batches a step, two points at step 8):
    each removal gets its rise, shared by the points removed at the same step (to float rounding)."""
    from surgery.remove_ln.report import loss_jumps

    steps = [s for s in range(16) for _ in range(2)]
    loss = [5.0 + 0.3 * (s >= 6) + 0.2 * (s >= 8) + 0.1 * (s >= 10) for s in steps]
    removed = [(6, "h.0.ln_q"), (8, "h.0.ln_k"), (8, "h.1.ln_k"), (10, "ln_f")]
    jumps = loss_jumps({"step": steps, "loss": loss}, removed)
    assert jumps == pytest.approx({"h.0.ln_q": 0.3, "h.0.ln_k": 0.1, "h.1.ln_k": 0.1, "ln_f": 0.1}, abs=1e-12)
