"""The training steps' forwards and losses compile without graph breaks (`torch._dynamo.explain` on CPU): the removal
step before, during and after removal (control twin, live teacher; the cached teacher during removal), the hybrid's distill and lm steps, and
the plain next-token loss; and a compiled removal step gives the eager step's losses and gradients."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from surgery.remove_ln.module import LNRemoval
from surgery.remove_ln.points import token_context
from surgery.training.chunked_loss import TopKTeacher
from surgery.training.distill import DistillConfig
from surgery.training.forward import ModelOutput

pytestmark = pytest.mark.slow
QUICKSTART = DistillConfig(lm_weight=0.5, kl_weight=1.0)
V = 64


class Tokenizer:
    eos_token_id = 0

    def __len__(self) -> int:
        return V


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny random GPT-2 (2 blocks, vocabulary 64) saved where the modules load it from."""
    from tiny_models import tiny_gpt2

    path = tmp_path_factory.mktemp("tiny")
    tiny_gpt2(seed=0).save_pretrained(path)
    return str(path)


def explain(fn, *args) -> int:
    dynamo.reset()
    result = dynamo.explain(fn)(*args)
    assert result.graph_count >= 1
    return result.graph_break_count


def batch(seed: int = 0) -> torch.Tensor:
    ids = torch.randint(1, V, (2, 32), generator=torch.Generator().manual_seed(seed))
    ids[0, 10] = 0  # one end-of-text token
    return ids


def removal(source: str, phase: str) -> LNRemoval:
    module = LNRemoval(source, control=True, distill=QUICKSTART, tokenizer=Tokenizer()).train()
    ids = batch(1)
    token_context(module.points).eot_mask = ids == 0
    with torch.no_grad():
        module.model(ids)  # measure each norm's scale once
    names = list(module.points)
    for name in {"before": [], "during": names[: len(names) // 2], "after": names}[phase]:
        module.points[name].go_fake()
    return module


@pytest.mark.parametrize("phase", ["before", "during", "after"])
def test_removal_step_compiles_without_graph_breaks(source, phase):
    module, ids = removal(source, phase), batch()
    token_context(module.points).eot_mask = ids == 0
    assert explain(module.step_losses, ids, None) == 0
    if phase != "during":
        return
    k = 8
    cached = ModelOutput(topk=TopKTeacher(torch.randint(0, V, (2, 32, k)), torch.full((2, 32, k), -3.0),
                                          torch.full((2, 32), 1 - k * torch.tensor(-3.0).exp().item())))
    assert explain(module.step_losses, ids, cached) == 0


def test_compiled_removal_step_equals_the_eager_step(source):
    """Same loss, gradients and recorded norm measurements (the moving averages' input) with and without compile.
    Backend aot_eager: dynamo's capture and AOT autograd (what could drop a side effect or a gradient) without
    inductor's code generation, which takes minutes on CPU."""
    module, ids = removal(source, "during"), batch()
    results = []
    for compiled in (False, True):
        module.zero_grad()
        context = token_context(module.points)
        context.eot_mask = ids == 0
        fn = torch.compile(module.step_losses, backend="aot_eager") if compiled else module.step_losses
        out = fn(ids, None)
        measured = [torch.cat([sums, counts]) for _, sums, counts, _ in context.pending]
        context.pending.clear()  # the second pass starts from the same moving averages
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in module.model.parameters()], measured))
    # fp32; a compiled graph may reorder reductions: 1e-5 relative on the loss, 1e-4 on gradients
    (loss, grads, measured), (loss_c, grads_c, measured_c) = results
    assert torch.allclose(loss_c, loss, rtol=1e-5)
    for a, b in zip(grads_c, grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1e-3)
    assert len(measured_c) == len(measured) > 0
    for a, b in zip(measured_c, measured):
        assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["retention", "gla"])
def test_hybrid_steps_compile_without_graph_breaks(source, mixer):
    from surgery.xatl.training.module import XatlLM

    module = XatlLM(source, mixer=mixer, distill=QUICKSTART, tokenizer=Tokenizer()).train()
    ids = batch()
    assert explain(module.step_losses, ids, True, None) == 0
    assert explain(module.step_losses, ids, False, None) == 0


def test_plain_lm_loss_compiles_without_graph_breaks(source):
    from surgery.training.lm import CausalLM

    module = CausalLM(source, tokenizer=Tokenizer()).train()
    assert explain(module.lm_loss, batch()) == 0
