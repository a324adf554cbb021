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

DEFAULT_CHUNK = 1024  # positions per chunk: 16 MB of fp32 logits at V = 4,096, 206 MB at 50,257


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


def _kl_live(z: torch.Tensor, zt: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of T^2 KL(softmax(zt/T) || softmax(z/T)) and its gradient with respect to z (rows, V)."""
    s = torch.log_softmax(z / temperature, dim=-1)
    t = torch.log_softmax(zt / temperature, dim=-1)
    p = t.exp()
    kl = (p * (t - s)).sum() * temperature**2
    return kl, (s.exp() - p) * temperature


def _kl_topk(z: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of the KL between the teacher's (k + 1)-bin distribution (top-k log-probs t (rows, k) and
    `rest` (rows,)) and the student's on the same bins, and its gradient with respect to the logits z (rows, V):
    q - p on the top k, q - rest * q / q_rest elsewhere (q = softmax(z))."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    z_rest = z.scatter(1, ids, float("-inf"))  # the top k left out: exp() of them is 0 below
    lse_rest = torch.logsumexp(z_rest, dim=-1, keepdim=True).clamp_min(-1e30)  # finite when k = V (no rest)
    log_q_top = z.gather(1, ids) - lse
    log_q_rest = (lse_rest - lse).squeeze(1)
    p = t.exp()
    has_rest = rest > 0
    rest_term = torch.where(has_rest, rest * (rest.clamp_min(1e-30).log() - log_q_rest), torch.zeros_like(rest))
    kl = (p * (t - log_q_top)).sum() + rest_term.sum()
    grad = (z - lse).exp() - rest[:, None] * (z_rest - lse_rest).exp()
    return kl, grad.scatter_add_(1, ids, -p)


class ChunkedLMLoss(torch.autograd.Function):
    """(loss, ce, kl) = lm_weight x ce + kl_weight x kl, ce, kl; only `loss` has gradients.

    Inputs: hidden (N, d) student final hidden states, head (V, d), targets (N,) next-token ids with -100 where
    there is none; then the teacher as `_teacher_args` packs it (kind 0: none, 1: live, 2: top-k).
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
            h = hidden[rows]
            z = (h @ head.t()).float()
            y = targets[rows]
            valid = y >= 0
            log_q = torch.log_softmax(z, dim=-1)
            ce = ce - log_q.gather(1, y.clamp_min(0)[:, None]).squeeze(1).masked_fill(~valid, 0).sum()
            g = None
            if want_grad:
                g = log_q.exp().scatter_add_(1, y.clamp_min(0)[:, None], -torch.ones_like(z[:, :1]))
                g = g * (valid[:, None].float() * (lm_weight / n_ce))
            if kind:
                if kind == 1:
                    zt = (t_a[rows] @ t_b.t()).float()
                    part, kl_grad = _kl_live(z, zt, temperature)
                else:
                    part, kl_grad = _kl_topk(z, t_a[rows], t_b[rows], t_c[rows])
                kl = kl + part
                if want_grad:
                    g = g + kl_grad * (kl_weight / n_kl)
            if want_grad:
                grad_hidden[rows] = (g.to(head.dtype) @ head).to(hidden.dtype)
                grad_head += g.t() @ h.to(g.dtype)
        ce = ce / n_ce
        kl = kl / n_kl
        loss = lm_weight * ce + kl_weight * kl
        ctx.save_for_backward(grad_hidden, grad_head.to(head.dtype) if want_grad else None)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        grad_hidden, grad_head = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_head * grad_loss.to(grad_head.dtype),
                None, None, None, None, None, None, None, None, None)


def chunked_lm_losses(hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor, teacher=None, lm_weight: float = 1.0,
                      kl_weight: float = 0.0, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK):
    """(loss, ce, kl) for student hidden states (B, T, d), head weight (V, d) and token ids (B, T); `teacher`
    a `LiveTeacher`, a `TopKTeacher` or None (kl then 0). `loss` = lm_weight x ce + kl_weight x kl carries the
    gradients; ce and kl (nats/token) are detached. A `TopKTeacher` needs temperature 1."""
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    kind, a, b, c = _teacher_args(teacher)
    if kind == 0:
        kl_weight = 0.0
    return ChunkedLMLoss.apply(hidden.flatten(0, 1), head, targets, kind, a, b, c, float(lm_weight), float(kl_weight),
                               float(temperature), int(chunk_size))
