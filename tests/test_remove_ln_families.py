"""Norm removal on every family layout: GPT-2, GPT-NeoX (parallel and sequential residual, partial rotary) and
Llama-style (RMSNorm, grouped-query attention), from preparing to a vanilla export that plain transformers loads."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.families import family_of, get_module
from surgery.remove_ln.export import export_ln_free
from surgery.remove_ln.points import prepare_for_removal, token_context
from surgery.remove_ln.split_input import AttnInputNorms
from remove_ln_models import FAMILY_CONFIGS, tiny_model

KINDS = list(FAMILY_CONFIGS)


def removed(kind: str, seed: int = 0):
    """(model prepared with every norm measured on training forwards and made fake, points)."""
    model = tiny_model(kind, seed)
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            token_context(points).eot_mask = None
            model(torch.randint(0, 64, (4, 24)))  # 96 tokens >= 3d: the folded matmul path
            model(torch.randint(0, 64, (1, 8)))  # the two-matmul path
            token_context(points).flush()
    model.eval()
    for ln in points.values():
        ln.go_fake()
    return model, points


@pytest.mark.parametrize("kind", KINDS)
def test_preparing_changes_no_logit_and_training_forwards_measure_every_point(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 64, (2, 20))
    before = model(ids).logits
    points = prepare_for_removal(model)
    assert (model(ids).logits - before).abs().max() < 1e-5
    assert len(points) == 3 * 2 + 1
    model.train()
    token_context(points).eot_mask = None
    model(ids)
    token_context(points).flush()
    assert all(int(ln.avg_count) == 1 for ln in points.values())  # q and k share one measurement of ln_1_qk
    assert all(ln.center == (kind != "llama") and (ln.bias is None) == (kind == "llama") for ln in points.values())


@pytest.mark.parametrize("kind", KINDS)
def test_value_path_reads_only_its_own_copy(kind):
    """Moving the value copy of the attention norm changes the attention output; moving the query/key copy
    of a block with a single token (attention weight 1 on itself) does not."""
    model = tiny_model(kind)
    points = prepare_for_removal(model)
    attn = get_module(model.get_submodule(family_of(model).blocks)[0], family_of(model).attn)
    ids = torch.randint(0, 64, (3, 1))
    captured = []
    attn.register_forward_hook(lambda m, a, out: captured.append(out[0].detach().clone()))
    model(ids)
    with torch.no_grad():
        points["h.0.ln_1_qk"].weight.mul_(3.0)
    model(ids)
    with torch.no_grad():
        points["h.0.ln_1_v"].weight.mul_(3.0)
    model(ids)
    assert torch.allclose(captured[0], captured[1], atol=1e-5)
    assert not torch.allclose(captured[1], captured[2], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_export_is_the_vanilla_class_with_the_same_logits(kind):
    model, _ = removed(kind)
    ids = torch.randint(0, 64, (3, 30))
    with torch.no_grad():
        fake, out = model(ids).logits, export_ln_free(model)
        exported = out(ids).logits
    assert type(out) is type(tiny_model(kind))
    assert not any(isinstance(m, AttnInputNorms) for m in out.modules())
    assert ((exported - fake).abs().max() / fake.abs().max()).item() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_export_norms_are_affine_in_their_input(kind):
    """Every norm left in the export maps c * x to c * (its output at x) minus what its bias adds: scaling the
    input by 1e-2 ... 1e3 scales the output the same, to 1e-5 relative."""
    model, _ = removed(kind)
    out = export_ln_free(model)
    norms = [m for m in out.modules() if "Norm" in type(m).__name__]
    assert len(norms) == 2 * 2 + 1
    x = torch.randn(5, 32)
    for norm in norms:
        bias = getattr(norm, "bias", None)
        bias = 0.0 if bias is None else bias
        base = norm(x) - bias
        for c in (1e-2, 1.0, 1e2, 1e3):
            got = norm(c * x) - bias
            assert torch.allclose(got, c * base, rtol=1e-5, atol=1e-6 * c * base.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_export_reloads_without_surgery_as_its_vanilla_class(kind, tmp_path):
    model, _ = removed(kind, seed=3)
    ids = torch.randint(0, 64, (2, 16))
    out = export_ln_free(model)
    out.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): logits = m(ids).logits\n"
        "assert not [n for n in sys.modules if n.split('.')[0] == 'surgery']\n"
        "print(json.dumps({'cls': type(m).__name__, 'logits': logits.tolist()}))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert result["cls"] == type(out).__name__
    got = torch.tensor(result["logits"])
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_an_exported_model_is_refused_as_already_ln_free(kind):
    model, _ = removed(kind)
    with pytest.raises(SurgeryError, match="already neutralised .* already LN-free, there is nothing to remove"):
        prepare_for_removal(export_ln_free(model))


def test_a_removal_schedule_naming_blocks_the_model_lacks_is_refused():
    from surgery.remove_ln.schedule import RemovalSchedule

    events = {f"h.{i}.{k}": 1 for i in range(3) for k in ("ln_2", "ln_1_qk", "ln_1_v")} | {"ln_f": 2}
    with pytest.raises(SurgeryError, match=r"schedule.events names \['h.2.ln_1_qk', 'h.2.ln_1_v', 'h.2.ln_2'\]"):
        RemovalSchedule(events=events).removal_steps(2)


def test_a_hybrid_with_mixer_layers_is_refused_naming_the_missing_projection():
    from xatl_models import source_and_hybrid

    _, hybrid = source_and_hybrid("llama", "gla", attn_layers=[1])
    with pytest.raises(SurgeryError, match=r"model.layers.0 has no attention input projection self_attn.q_proj \(a hybrid's mixer layer\?\)"):
        prepare_for_removal(hybrid)
