"""Next-token cross-entropy and KL to a teacher, computed from final hidden states and the LM head in chunks
of positions, so that the (positions, vocabulary) logits never exist whole, in the forward or the backward.

The plain computation `logits = hidden @ head.T` holds B x T x V fp32 values (13 GB for 64 x 1,024 tokens at
GPT-2's 50,257 entries), several times over with log-softmax, a teacher's logits and their gradients. Here
`ChunkedLMLoss` (a `torch.autograd.Function`) takes `chunk_size` positions at a time: their logits, the loss
terms, and at once their gradients with respect to the hidden states and the head (the head's summed over
chunks), as Liger-kernel's fused linear cross-entropy does. Backward only scales the stored gradients. Peak
memory beyond the inputs: a few (chunk_size, V) fp32 buffers, the hidden states' gradient and the head's.

Terms, with the same definitions as `surgery.training.distill` (which checks them against the plain ones):
- ce: mean over positions 0..T-2 of -log softmax(z_t)[ids_{t+1}] (nats/token);
- kl: T^2 x mean over all B x T positions of KL(softmax(teacher / T) || softmax(student / T)), the teacher given
  as its own hidden states and head (`LiveTeacher`) or as cached top-k log-probabilities plus the remaining
  mass (`TopKTeacher`, T = 1; the KL between the two distributions over the k entries and one "rest" bin).

Gradients are written out (no autograd inside), so `torch.compile` traces the whole loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class LiveTeacher:
    """A teacher run on the same batch: its final hidden states (B, T, d_t) and head weight (V, d_t)."""

    hidden: torch.Tensor
    head: torch.Tensor


@dataclass
class TopKTeacher:
    """Cached teacher targets at temperature 1: per position (B, T), the k most likely next tokens `ids`
    (B, T, k) long, their log-probabilities `log_probs` (B, T, k) and the probability of every other entry
    together `rest` (B, T) in [0, 1]."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    rest: torch.Tensor


def _teacher_args(teacher) -> tuple:
    if teacher is None:
        return 0, None, None, None
    if isinstance(teacher, LiveTeacher):
        return 1, teacher.hidden.flatten(0, 1), teacher.head, None
    return 2, teacher.ids.flatten(0, 1), teacher.log_probs.flatten(0, 1).float(), teacher.rest.flatten().float()


def auto_chunk(n: int, d: int, vocab: int) -> int:
    """Positions per chunk whose logits hold about as many entries as the hidden states (n x d), as Liger-kernel
    sizes its chunks: 16 of 1,024 positions at GPT-2's width and vocabulary, about 1,000 of 65,536."""
    return max(1, min(n, -(-n * d // vocab)))


def _chunk(z, y, kind, ta, tb, tc, temperature, w_ce, w_kl, want_grad):
    """CE and KL summed over the rows of one chunk, and d(w_ce-weighted CE + w_kl KL)/dz (None without `want_grad`).

    z (rows, V) fp32 logits; y (rows,) targets (-100: none); w_ce (rows, 1) per-row CE weight (0 where y < 0);
    the teacher rows as `_teacher_args` packs them. Each (rows, V) pass is shared where it can be: q = softmax(z)
    serves the CE, its gradient and the KL at T = 1.
    """
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    q = (z - lse).exp_()
    yc = y.clamp_min(0)[:, None]
    valid = (y >= 0).float()
    ce = ((lse - z.gather(1, yc)).squeeze(1) * valid).sum()
    kl = torch.zeros_like(ce)
    g = q * w_ce if want_grad else None
    if want_grad:
        g.scatter_add_(1, yc, -w_ce)
    if kind == 1:  # live teacher: zt (rows, V) from its hidden states and head
        zt = (ta @ tb.t()).float()
        t = torch.log_softmax(zt if temperature == 1 else zt / temperature, dim=-1)
        p = t.exp()
        if temperature == 1:
            kl = (p * (t - z)).sum() + (lse.squeeze(1) * p.sum(-1)).sum()  # log q = z - lse
            s_q = q
        else:
            log_s = torch.log_softmax(z / temperature, dim=-1)
            kl = (p * (t - log_s)).sum() * temperature**2
            s_q = log_s.exp()
        if want_grad:
            g.add_(s_q - p, alpha=w_kl * temperature)
    elif kind == 2:  # cached top-k: ids ta (rows, k), log-probs tb (rows, k), rest tc (rows,)
        q_rest = q.scatter(1, ta, 0.0)  # the student's probabilities outside the teacher's top k
        s_rest = q_rest.sum(-1).clamp_min(1e-30)
        p = tb.exp()
        kl = (p * (tb - z.gather(1, ta) + lse)).sum()
        kl = kl + torch.where(tc > 0, tc * (tc.clamp_min(1e-30).log() - s_rest.log()), torch.zeros_like(tc)).sum()
        if want_grad:  # q - p on the top k, q - rest * q / q_rest elsewhere
            g.add_(q, alpha=w_kl)
            g.sub_(q_rest * (tc / s_rest * w_kl)[:, None])
            g.scatter_add_(1, ta, -w_kl * p)
    return ce, kl, g


class ChunkedLMLoss(torch.autograd.Function):
    """(loss, ce, kl) = lm_weight x ce + kl_weight x kl, ce, kl; only `loss` has gradients.

    Inputs: hidden (N, d) student final hidden states, head (V, d), targets (N,) next-token ids with -100 where
    there is none; then the teacher as `_teacher_args` packs it (kind 0: none, 1: live, 2: top-k). The gradients are
    computed in forward and scaled in place in backward: backpropagate through it once (no retain_graph).
    """

    @staticmethod
    def forward(ctx, hidden, head, targets, kind, t_a, t_b, t_c, lm_weight, kl_weight, temperature, chunk_size):
        n_ce = (targets >= 0).sum().clamp_min(1).float()
        n_kl = hidden.shape[0]
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if want_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, y = hidden[rows], targets[rows]
            z = (h @ head.t()).float()
            w_ce = ((y >= 0).float() * (lm_weight / n_ce))[:, None]
            ta = t_a[rows] if kind else None
            tb = t_b if kind == 1 else (t_b[rows] if kind else None)
            tc = t_c[rows] if kind == 2 else None
            part_ce, part_kl, g = _chunk(z, y, kind, ta, tb, tc, temperature, w_ce, kl_weight / n_kl, want_grad)
            ce, kl = ce + part_ce, kl + part_kl
            if want_grad:
                grad_hidden[rows] = (g.to(head.dtype) @ head).to(hidden.dtype)
                grad_head.addmm_(g.t(), h.to(g.dtype))  # in place: no (V, d) temporary per chunk
        ce = ce / n_ce
        kl = kl / n_kl
        loss = lm_weight * ce + kl_weight * kl
        ctx.save_for_backward(grad_hidden, grad_head.to(head.dtype) if want_grad else None)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        grad_hidden, grad_head = ctx.saved_tensors  # scaled in place: no second copy of the head's gradient
        return (grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_head.mul_(grad_loss.to(grad_head.dtype)),
                None, None, None, None, None, None, None, None, None)


def chunked_lm_losses(hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor, teacher=None, lm_weight: float = 1.0,
                      kl_weight: float = 0.0, temperature: float = 1.0, chunk_size: int | None = None):
    """(loss, ce, kl) for student hidden states (B, T, d), head weight (V, d) and token ids (B, T); `teacher`
    a `LiveTeacher`, a `TopKTeacher` or None (kl then 0). `loss` = lm_weight x ce + kl_weight x kl carries the
    gradients; ce and kl (nats/token) are detached. A `TopKTeacher` needs temperature 1. `chunk_size`: positions
    per chunk; None: `auto_chunk`."""
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    kind, a, b, c = _teacher_args(teacher)
    if kind == 0:
        kl_weight = 0.0
    n, d = ids.numel(), hidden.shape[-1]
    chunk_size = chunk_size or auto_chunk(n, d, head.shape[0])
    return ChunkedLMLoss.apply(hidden.flatten(0, 1), head, targets, kind, a, b, c, float(lm_weight), float(kl_weight),
                               float(temperature), int(chunk_size))
