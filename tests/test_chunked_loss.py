"""The chunked loss against the plain full-logits computation with torch's own cross_entropy and kl_div.

Tolerances: fp32 on CPU, where the chunked loss sums the same terms in a different order; losses within 1e-5
relative, gradients within 1e-5 of the largest reference entry (observed ~1e-7). Parameters are random and
not at initialization (heads of scale 0.5, so logits are of order 1-10 and the softmaxes far from uniform).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surgery.training.chunked_loss import LiveTeacher, TopKTeacher, chunked_lm_losses
from surgery.training.distill import DistillConfig, Distiller, lm_cross_entropy
from surgery.training.forward import head_weight

REL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() <= REL * b.abs().max().clamp_min(1e-12), (a - b).abs().max()


def inputs(seed: int = 0, B: int = 3, T: int = 9, d: int = 16, V: int = 97):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g).requires_grad_()
    W = (0.5 * torch.randn(V, d, generator=g)).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    return h, W, ids, torch.randn(B, T, d, generator=g), 0.5 * torch.randn(V, d, generator=g)


def reference(h, W, ids, teacher_logits, lm_weight, kl_weight, T):
    z = h @ W.t()
    ce = F.cross_entropy(z[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    kl = F.kl_div(F.log_softmax(z / T, -1).flatten(0, 1), F.log_softmax(teacher_logits / T, -1).flatten(0, 1),
                  log_target=True, reduction="batchmean") * T**2
    return lm_weight * ce + kl_weight * kl, ce, kl


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_live_teacher_losses_and_gradients_equal_the_full_logits(chunk, T):
    h, W, ids, ht, Wt = inputs()
    loss, ce, kl = chunked_lm_losses(h, W, ids, LiveTeacher(ht, Wt), 0.5, 1.0, T, chunk)
    ref = reference(h, W, ids, ht @ Wt.t(), 0.5, 1.0, T)
    for a, b in zip((loss, ce, kl), ref):
        close(a.detach(), b.detach())
    for a, b in zip(torch.autograd.grad(3 * loss, (h, W)), torch.autograd.grad(3 * ref[0], (h, W))):
        close(a, b)


def test_cross_entropy_alone_equals_torch_and_needs_no_grad_under_no_grad():
    h, W, ids, _, _ = inputs(1)
    loss, ce, kl = chunked_lm_losses(h, W, ids, chunk_size=5)
    ref = F.cross_entropy((h @ W.t())[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    close(loss.detach(), ref.detach())
    assert kl.item() == 0
    for a, b in zip(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(ref, (h, W))):
        close(a, b)
    with torch.no_grad():
        assert not chunked_lm_losses(h, W, ids, chunk_size=5)[0].requires_grad


@pytest.mark.parametrize("k", [1, 5, 96])
def test_top_k_kl_equals_the_kl_between_k_plus_one_bins(k):
    h, W, ids, ht, Wt = inputs(2)
    t = F.log_softmax(ht @ Wt.t(), -1)
    top = t.topk(k, -1)
    rest = (1 - top.values.exp().sum(-1)).clamp_min(0)
    loss, ce, kl = chunked_lm_losses(h, W, ids, TopKTeacher(top.indices, top.values, rest), 0.5, 1.0, 1.0, 4)
    s = F.log_softmax(h @ W.t(), -1)
    s_top = s.gather(-1, top.indices)
    s_rest = torch.log1p(-s_top.exp().sum(-1))
    # the coarse distributions written out as (k + 1)-vectors, compared by torch's kl_div
    p = torch.cat([top.values, rest.clamp_min(1e-30).log()[..., None]], -1)
    q = torch.cat([s_top, s_rest[..., None]], -1)
    ref_kl = F.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean")
    ref = 0.5 * F.cross_entropy((h @ W.t())[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + ref_kl
    close(kl, ref_kl.detach())
    for a, b in zip(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(ref, (h, W))):
        close(a, b)


def test_top_k_with_all_but_one_entry_approaches_the_full_kl():
    h, W, ids, ht, Wt = inputs(3, V=11)
    t = F.log_softmax(ht @ Wt.t(), -1)
    top = t.topk(10, -1)
    rest = (1 - top.values.exp().sum(-1)).clamp_min(0)
    _, _, kl = chunked_lm_losses(h, W, ids, TopKTeacher(top.indices, top.values, rest), 0.0, 1.0, 1.0, 4)
    _, _, full = reference(h, W, ids, ht @ Wt.t(), 0.0, 1.0, 1.0)
    close(kl, full.detach())  # with k = V - 1 the rest bin is one entry: the coarse KL is the KL


@pytest.mark.parametrize("family", ["gpt2", "hybrid"])
def test_distiller_chunked_equals_full_logits_on_a_model(family):
    from tiny_models import tiny_gpt2

    student, teacher = tiny_gpt2(seed=1).train(), tiny_gpt2(seed=2)
    if family == "hybrid":
        from surgery.xatl.hybrid.model import hybrid_config_from, hybrid_model

        torch.manual_seed(3)
        student = hybrid_model(hybrid_config_from(student.config, "retention")).train()
    assert head_weight(student) is not None
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    results = []
    for chunk in (0, 5):
        config = DistillConfig(lm_weight=0.5, kl_weight=1.0, temperature=2.0, chunk_size=chunk)
        out = Distiller(config, teacher)(student, ids)
        student.zero_grad()
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in student.parameters()]))
    close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        assert (a - b).abs().max() <= REL * max(b.abs().max(), 1e-3)
    close(lm_cross_entropy(student, ids).detach(), student(ids, labels=ids).loss.detach())


def test_a_hooked_head_is_run_for_its_full_logits():
    """A forward hook on the LM head (reading or editing the logits) still runs: the model is not chunked then.
    Also guards nn.Module's private hook dicts that `head_weight` reads."""
    from tiny_models import tiny_gpt2

    model = tiny_gpt2(seed=1)
    assert head_weight(model) is not None
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    plain = lm_cross_entropy(model, ids)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.shape) or 2 * out)
    assert head_weight(model) is None
    doubled = lm_cross_entropy(model, ids)
    assert seen == [(2, 16, 64)] and not torch.allclose(doubled, plain)
    close(doubled.detach(), model(ids, labels=ids).loss.detach())
    handle.remove()
    pre = model.lm_head.register_forward_pre_hook(lambda mod, args: None)
    assert head_weight(model) is None
    pre.remove()
    assert head_weight(model) is not None
