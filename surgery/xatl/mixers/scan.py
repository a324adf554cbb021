"""The recurrences behind the linear-cost mixers, each as a fast form and a sequential reference.

Two recurrences cover all mixers:

- the selective scan (Mamba-1), per channel e and state entry n:
  ``h_t = a_t * h_{t-1} + u_t``  with ``a_t = exp(dt_t A)`` and ``u_t = dt_t B_t x_t``; ``y_t = sum_n C_t h_t``.
- gated linear attention (GLA; retention is the case of a fixed per-head decay), per head:
  ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` with ``S`` of shape (K, V) and ``g_t <= 0``;
  Mamba-2's SSD is the case of one data-dependent decay per head (`ssd_chunked`).

The fast forms never exponentiate a positive number, so they are as stable as the sequential loops and
agree with them to float32 rounding (tests: max abs diff < 1e-5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from surgery.errors import SurgeryError


# ----------------------------------------------------------------------------------------------- selective scan
def selective_scan_sequential(a: torch.Tensor, u: torch.Tensor, c: torch.Tensor, h0: torch.Tensor | None = None):
    """Reference: one step at a time.

    a, u: (B, T, E, N) decay in (0, 1] and input; c: (B, T, N); h0: (B, E, N) or None (zeros).
    Returns y (B, T, E) and the final state (B, E, N).
    """
    h = torch.zeros_like(a[:, 0]) if h0 is None else h0
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + u[:, t]
        ys.append(torch.einsum("ben,bn->be", h, c[:, t]))
    return torch.stack(ys, 1), h


def selective_scan_chunked(
    a: torch.Tensor, u: torch.Tensor, c: torch.Tensor, h0: torch.Tensor | None = None, chunk: int | None = None
):
    """Same result as `selective_scan_sequential` (shapes as there) in about 2*sqrt(T) vectorised steps
    instead of T: (1) scan every chunk of `chunk` steps from a zero state, all chunks at once, also keeping
    the running decay product P; (2) carry the state across chunk boundaries; (3) add P_t * (state at the
    chunk's start) everywhere. Only products of decays in (0, 1] appear, so it is as stable as the loop.
    `chunk` defaults to ceil(sqrt(T))."""
    Bsz, T, E, N = a.shape
    L = chunk or max(1, math.ceil(math.sqrt(T)))
    nC = -(-T // L)
    pad = nC * L - T
    if pad:  # identity steps: decay 1, input 0
        a = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0)
        u, c = F.pad(u, (0, 0, 0, 0, 0, pad)), F.pad(c, (0, 0, 0, pad))
    a, u = a.view(Bsz, nC, L, E, N), u.view(Bsz, nC, L, E, N)
    h, p = torch.zeros_like(a[:, :, 0]), torch.ones_like(a[:, :, 0])
    local, prod = [], []
    # unbind() once instead of indexing a[:, :, i] each step: indexing a view in a loop makes autograd
    # keep one scatter per step, which dominated the backward pass
    for a_i, u_i in zip(a.unbind(2), u.unbind(2)):  # (1) all chunks in parallel
        h, p = a_i * h + u_i, p * a_i
        local.append(h)
        prod.append(p)
    last_local, last_prod = local[-1].unbind(1), prod[-1].unbind(1)  # each chunk's end, (B, E, N)
    local, prod = torch.stack(local, 2), torch.stack(prod, 2)  # (B, nC, L, E, N)
    carry = torch.zeros_like(a[:, 0, 0]) if h0 is None else h0
    starts = []
    for p_k, h_k in zip(last_prod, last_local):  # (2) chunk boundaries
        starts.append(carry)
        carry = p_k * carry + h_k
    hs = local + prod * torch.stack(starts, 1)[:, :, None]  # (3)
    y = torch.einsum("bclen,bcln->bcle", hs, c.view(Bsz, nC, L, N)).reshape(Bsz, nC * L, E)
    return y[:, :T], carry


# ----------------------------------------------------------------------------------- gated linear attention
def gla_recurrent(q, k, v, g, s0: torch.Tensor | None = None):
    """Reference: one step at a time.

    q, k: (B, H, T, K); v: (B, H, T, V); g: log decay <= 0, (B, H, T, K) or (B|1, H, T, 1) (one decay per head);
    s0: (B, H, K, V) or None. Returns o (B, H, T, V) and the final state (B, H, K, V).
    """
    Bsz, H, T, K = q.shape
    S = q.new_zeros(Bsz, H, K, v.shape[-1]) if s0 is None else s0
    g = g.expand(Bsz, H, T, g.shape[-1])
    out = []
    for t in range(T):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(out, 2), S


def gla_chunked(q, k, v, g, s0: torch.Tensor | None = None, chunk: int = 32):
    """Same result as `gla_recurrent` (shapes as there) in chunks of `chunk` tokens: exact attention-like
    products inside a chunk, the (K, V) state passed between chunks. With one decay per head
    (g of last size 1) the intra-chunk decay is a (L, L) matrix, otherwise (L, L, K)."""
    Bsz, H, T, K = q.shape
    S = q.new_zeros(Bsz, H, K, v.shape[-1]) if s0 is None else s0
    g = g.expand(Bsz, H, T, g.shape[-1])
    outs = []
    for s in range(0, T, chunk):
        qc, kc, vc = q[:, :, s : s + chunk], k[:, :, s : s + chunk], v[:, :, s : s + chunk]
        b = g[:, :, s : s + chunk].cumsum(2)  # (B, H, L, K|1), <= 0 and decreasing
        L = qc.shape[2]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        diff = b[:, :, :, None] - b[:, :, None, :]  # (B, H, L, L, K|1): b_t - b_s, <= 0 where s <= t
        decay = diff.masked_fill(~causal[..., None], float("-inf")).exp()
        if g.shape[-1] == 1:
            att = (qc @ kc.transpose(-1, -2)) * decay[..., 0]
        else:
            att = torch.einsum("bhtk,bhsk,bhtsk->bhts", qc, kc, decay)
        o = att @ vc + (qc * b.exp()) @ S
        last = b[:, :, -1:]  # (B, H, 1, K|1)
        S = last.transpose(-1, -2).exp() * S if g.shape[-1] == 1 else last[:, :, 0, :, None].exp() * S
        S = S + (kc * (last - b).exp()).transpose(-1, -2) @ vc
        outs.append(o)
    return torch.cat(outs, 2), S


def ssd_chunked(q, k, v, g, s0: torch.Tensor | None = None, chunk: int = 64):
    """`gla_recurrent` with one decay per head (Mamba-2's SSD) in chunks of `chunk` tokens, every chunk at once:
    q, k: (B, H, T, N); v: (B, H, T, P); g: log decay <= 0, (B, H, T); s0: (B, H, N, P) or None. Inside a chunk
    exact attention-like products; each chunk's own final state; the state entering chunk c as a weighted sum of
    earlier chunks' states (weights exp(sum of the chunk decays in between), a (chunks+1, chunks) matrix); then
    each position reads the state its chunk started from. Only differences of decreasing cumulative sums are
    exponentiated, so nothing overflows. Returns o (B, H, T, P) and the final state (B, H, N, P)."""
    Bsz, H, T, N = q.shape
    P = v.shape[-1]
    L = min(chunk, T)
    nC = -(-T // L)
    pad = nC * L - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = F.pad(g, (0, pad))
    q, k, v = q.view(Bsz, H, nC, L, N), k.view(Bsz, H, nC, L, N), v.view(Bsz, H, nC, L, P)
    b = g.view(Bsz, H, nC, L).cumsum(-1)  # within-chunk log decay, <= 0, decreasing
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    o = ((q @ k.transpose(-1, -2)) * decay) @ v
    last = b[..., -1]  # (B, H, nC)
    local = (k * (last[..., None] - b).exp()[..., None]).transpose(-1, -2) @ v  # (B, H, nC, N, P)
    A = F.pad(last.cumsum(-1), (1, 0))  # A_c = sum_{j<c} last_j, (B, H, nC + 1)
    diff = A[..., :, None] - A[..., None, 1:]  # A_c - A_{c'+1}, (B, H, nC + 1, nC)
    mask = torch.ones(nC + 1, nC, dtype=torch.bool, device=q.device).tril(-1)
    M = diff.masked_fill(~mask, float("-inf")).exp()
    states = torch.einsum("bhcd,bhdnp->bhcnp", M, local)
    if s0 is not None:
        states = states + A.exp()[..., None, None] * s0[:, :, None]
    o = o + (q * b.exp()[..., None]) @ states[:, :, :nC]
    return o.reshape(Bsz, H, nC * L, P)[:, :, :T], states[:, :, nC]


def window_attention(q, k, v, window: int, past: tuple | None = None, summary: bool = False):
    """Causal softmax attention of each query over its last `window` keys (itself included), in chunks of
    `window` queries, each against the `window - 1` keys before it and its own: O(T * window), not O(T^2).

    With `summary`, every token that has left the window is represented by one more softmax entry: the mean of
    their keys as key, the mean of their values as value, and the log of their count added to its score. That
    entry's weight is what the softmax over all of them would give if their scores were all equal to the score
    against the mean key (by Jensen's inequality, never more), so the window keeps roughly the share of attention
    it had in the full softmax instead of all of it; the state grows by two sums and a count, still constant in T.

    q (already scaled), k: (B, H, T, K); v: (B, H, T, V); past: from a previous call, or None:
    (keys (B, H, window - 1, K), values (B, H, window - 1, V), filled (B,) how many of those slots hold real
    tokens, right-aligned), and with `summary` the sums of the keys (B, H, K) and values (B, H, V) that have left
    the window and their count (B,). Returns o (B, H, T, V) and the new past, of the same fixed size.
    """
    Bsz, H, T, _ = q.shape
    P = window - 1
    if past is None:
        past = (k.new_zeros(Bsz, H, P, k.shape[-1]), v.new_zeros(Bsz, H, P, v.shape[-1]),
                torch.zeros(Bsz, dtype=torch.long, device=q.device))
        if summary:
            past += (k.new_zeros(Bsz, H, k.shape[-1]), v.new_zeros(Bsz, H, v.shape[-1]), q.new_zeros(Bsz))
    k_past, v_past, filled = past[:3]
    k_all, v_all = torch.cat([k_past, k], 2), torch.cat([v_past, v], 2)  # token t of this call at index P + t
    idx = torch.arange(P + T, device=q.device)
    valid = idx[None, :] >= (P - filled)[:, None]  # (B, P + T): empty slots of the past are never attended to
    if summary:  # query t's left-out tokens: those summed in the past and the slots before index t of k_all
        w = valid[:, None, :T, None].to(k.dtype)
        k_out = past[3][:, :, None] + torch.cumsum(k_all[:, :, :T] * w, 2) - k_all[:, :, :T] * w
        v_out = past[4][:, :, None] + torch.cumsum(v_all[:, :, :T] * w, 2) - v_all[:, :, :T] * w
        n_out = (past[5][:, None] + torch.cumsum(w[:, 0, :, 0], 1) - w[:, 0, :, 0])[:, None, :, None]  # (B,1,T,1)
        n_safe = n_out.clamp(min=1)
        s_out = (q * k_out).sum(-1, keepdim=True) / n_safe + n_safe.log()
        s_out = s_out.masked_fill(n_out == 0, float("-inf"))  # (B, H, T, 1)
    outs = []
    for s in range(0, T, window):
        e = min(s + window, T)
        qi = idx[s + P : e + P, None]  # (L, 1): query indices; keys of the chunk: [s, e + P)
        kj = idx[None, s : e + P]
        mask = (kj <= qi) & (kj > qi - window)
        mask = mask[None, None] & valid[:, None, None, s : e + P]
        scores = (q[:, :, s:e] @ k_all[:, :, s : e + P].transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        if not summary:
            outs.append(scores.softmax(-1) @ v_all[:, :, s : e + P])
            continue
        p = torch.cat([scores, s_out[:, :, s:e]], -1).softmax(-1)
        outs.append(p[..., :-1] @ v_all[:, :, s : e + P] + p[..., -1:] * v_out[:, :, s:e] / n_safe[:, :, s:e])
    keep = k_all.shape[2] - P
    new = (k_all[:, :, keep:], v_all[:, :, keep:], (filled + T).clamp(max=P))
    if summary:  # the slots before index T leave the window
        w = valid[:, None, :keep, None].to(k.dtype)
        new += (past[3] + (k_all[:, :, :keep] * w).sum(2), past[4] + (v_all[:, :, :keep] * w).sum(2),
                past[5] + w[:, 0, :, 0].sum(1))
    return torch.cat(outs, 2), new


def rotate_window(q: torch.Tensor, k: torch.Tensor, position_embeddings: tuple | None):
    """A window's query and key rotated by a source's rotary (cos, sin); a mixer with `window_rotary` that was
    handed none is refused."""
    if position_embeddings is None:
        raise SurgeryError("window_rotary: no rotary position embeddings reached the mixer (a source without rotary "
                           "embeddings, such as GPT-2, has none); set window_rotary: false")
    return rotate(q, *position_embeddings), rotate(k, *position_embeddings)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half layout (GPT-NeoX, Llama and their descendants): t (B, H, T, d);
    cos, sin (B, T, r) as a source's rotary module gives them, rotating the first r <= d channels of each head."""
    r = cos.shape[-1]
    cos, sin = cos[:, None].to(t.dtype), sin[:, None].to(t.dtype)
    head, rest = t[..., :r], t[..., r:]
    half = torch.cat([-head[..., r // 2 :], head[..., : r // 2]], -1)
    return torch.cat([head * cos + half * sin, rest], -1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, past: torch.Tensor | None):
    """Depthwise causal convolution. x: (B, E, T); weight: (E, 1, W); past: (B, E, W-1) inputs before x
    (zeros when None). Returns (y (B, E, T), the last W-1 inputs (B, E, W-1) for the next call)."""
    W = weight.shape[-1]
    past = x.new_zeros(x.shape[0], x.shape[1], W - 1) if past is None else past
    full = torch.cat([past, x], -1)
    if x.shape[-1] == 1:  # one decoding step: a W-term dot product per channel (conv1d costs ~10x more here)
        y = torch.einsum("bew,ew->be", full, weight[:, 0])[..., None] + bias[:, None]
    elif torch.is_grad_enabled():  # W shifted multiply-adds: forward + backward ~2x faster than conv1d's on CPU
        T = x.shape[-1]
        y = bias[:, None] + full[..., :T] * weight[:, :, 0]
        for i in range(1, W):
            y = y + full[..., i : i + T] * weight[:, :, i]
    else:
        y = F.conv1d(full, weight, bias, groups=x.shape[1])
    return y, full[..., full.shape[-1] - (W - 1) :]
