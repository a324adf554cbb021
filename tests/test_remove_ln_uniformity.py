"""The scale-uniformity loss at the QK-norms and post-norms: against the inputs transformers' own norms receive, on
tiny randomized Qwen3, Gemma 3 and OLMo 2 models."""

import copy

import pytest
import torch

from norm_family_models import KINDS, random_tokens, tiny_norm_family
from surgery.families import family_of, get_module
from surgery.remove_ln.points import prepare_for_removal
from surgery.remove_ln.uniformity import ScaleUniformity
from remove_ln_models import tiny_model


def _reference_loss(inputs: list[torch.Tensor], keep: torch.Tensor, eps: float, n_tokens: int) -> torch.Tensor:
    """Float64, one norm and one head at a time: the mean over norms of the mean over heads of the kept tokens' mean
    squared relative deviation of the rms from its kept-token mean."""
    terms = []
    for x in inputs:
        x = x.double()
        if x.dim() == 4 and x.shape[1] != n_tokens:  # (B, H, T, d) -> (B, T, H, d)
            x = x.transpose(1, 2)
        s = (x.pow(2).mean(-1) + eps).sqrt()
        s = s if s.dim() == 3 else s[..., None]
        heads = [s[..., h][keep] for h in range(s.shape[-1])]
        terms.append(sum(((kept / kept.mean() - 1) ** 2).mean() for kept in heads) / len(heads))
    return torch.stack(terms).mean()


def _hf_norm_inputs(model) -> list[torch.Tensor]:
    """The list the inputs of transformers' own norms at the input-only roles go to, on each forward."""
    fam, seen = family_of(model), []
    paths = [fam.qk_norm_paths[0], fam.qk_norm_paths[1]] if fam.qk_norm else []
    paths += [p for p in (fam.attn_out_norm, fam.mlp_out_norm) if p]
    for block in get_module(model, fam.blocks):
        for path in paths:
            get_module(block, path).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_is_that_of_the_inputs_transformers_norms_receive(kind):
    model = tiny_norm_family(kind)
    ids = random_tokens(3, 16)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 5:9] = False
    reference = copy.deepcopy(model).train()
    seen = _hf_norm_inputs(reference)
    reference(ids)
    points = prepare_for_removal(model)
    uniformity = ScaleUniformity(points)
    expected_kinds = {"qwen3": {"ln_q", "ln_k"}, "gemma3": {"ln_q", "ln_k", "ln_attn_out", "ln_mlp_out"},
                      "olmo2": {"ln_q", "ln_k", "ln_attn_out", "ln_mlp_out"}}[kind]
    assert {n.rsplit(".", 1)[-1] for n in uniformity.norms} == expected_kinds
    model.train()(ids)
    loss = uniformity.loss(keep)
    eps = next(iter(points.values())).eps
    want = _reference_loss(seen, keep, eps, ids.shape[1])
    assert len(seen) == len(uniformity.norms)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert want > 1e-3  # randomized weights: the scales are far from uniform
    loss.backward()  # it trains the projections that feed those norms
    trained = {n.replace(".proj.", ".").split(".")[-2] for n, p in model.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"q_proj", "k_proj"} <= trained and (kind == "qwen3" or {"o_proj", "down_proj"} <= trained)


def test_it_is_zero_for_uniform_scales_and_ignores_the_tokens_left_out():
    model = tiny_norm_family("qwen3")
    uniformity = ScaleUniformity(prepare_for_removal(model))
    keep = torch.ones(2, 6, dtype=torch.bool)
    x = torch.randn(2, 6, 4, 8)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]  # rms = head's value
    name = next(iter(uniformity.norms))
    uniformity.inputs = {name: x}
    assert uniformity.loss(keep).item() == pytest.approx(0.0, abs=1e-8)
    y = x.clone()
    y[0, 2] *= 5.0
    uniformity.inputs = {name: y}
    keep[0, 2] = False
    assert uniformity.loss(keep).item() == pytest.approx(0.0, abs=1e-8)
    keep[0, 2] = True
    uniformity.inputs = {name: y}
    unscaled = uniformity.loss(keep)
    uniformity.inputs = {name: 7.0 * y}
    assert unscaled.item() > 0.1 and uniformity.loss(keep).item() == pytest.approx(unscaled.item(), rel=1e-5)


def test_nothing_is_kept_outside_training_and_pre_norm_models_have_no_such_norm():
    model = tiny_norm_family("olmo2")
    uniformity = ScaleUniformity(prepare_for_removal(model))
    ids = random_tokens(2, 8)
    model.eval()(ids)
    with torch.no_grad():
        model.train()(ids)
    assert uniformity.inputs == {}
    llama = ScaleUniformity(prepare_for_removal(tiny_model("llama")))
    assert llama.norms == {} and llama.loss(torch.ones(2, 8, dtype=torch.bool)).item() == 0.0
