"""Linear-attention mixers: RetNet-style retention (fixed per-head decay) and gated linear attention
(data-dependent per-key decay, Yang et al. 2023). Both compute, per head,
``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, then a per-head RMS norm, a SiLU output gate
and an output projection. State per sequence: S, (B, H, K, V), constant in T.

With `window` > 0 a mixer also attends exactly (softmax, the same q, k, v) to its last `window` tokens and adds
that to the gated linear-attention output, as LoLCATs (Zhang et al. 2024) and Based (Arora et al. 2024) pair
linear attention with a sliding window: the window's keys and values join the state, still constant in T.
The linear branch starts at zero (its norm gain), so a mixer given a source's Q/K/V/O starts as the source's
attention cut to the window (exact for sources with absolute positions, e.g. GPT-2; rotary sources' windows
start without their rotation).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from surgery.errors import SurgeryError
from surgery.xatl.mixers.kernels import cuda_kernel, try_kernel
from surgery.xatl.mixers.scan import gla_chunked, gla_recurrent, rms_norm, rotate_window, window_attention


class LinearAttentionMixer(nn.Module):
    """Shared body. Subclasses define `log_decay(x)` -> (B|1, H, T, K|1), entries <= 0.

    Args:
        d_model: residual width. n_head: heads. key_dim: total query/key width (default d_model).
        chunk: chunk length of the chunked form. q/k/v projections have biases so GPT-2's Q/K/V fit whole.
        window: tokens each position also attends to by softmax (itself included); 0: none.
        window_summary: the tokens that have left the window join that softmax as one entry, their mean key and
            value (`surgery.xatl.mixers.scan.window_attention`).
        window_rotary: the window's query and key are rotated by the position embeddings the decoder layer hands
            attention, as a rotary source's attention rotates its own (Pythia, Llama-style).
    """

    fla_kernel: tuple[str, str] | None = None

    def __init__(self, d_model: int, n_head: int, key_dim: int | None = None, chunk: int = 32, window: int = 0,
                 window_summary: bool = False, window_rotary: bool = False):
        super().__init__()
        if window < 0:
            raise SurgeryError(f"window={window}: give the number of recent tokens to attend to exactly, or 0 for none")
        if (window_summary or window_rotary) and not window:
            raise SurgeryError("window_summary and window_rotary act on the softmax window: set window > 0 too")
        self.window, self.window_summary, self.window_rotary = window, window_summary, window_rotary
        key_dim = key_dim or d_model
        if key_dim % n_head or d_model % n_head:
            raise SurgeryError(f"key width {key_dim} and width {d_model} must both divide by n_head={n_head}")
        self.d_model, self.n_head, self.chunk = d_model, n_head, chunk
        self.head_k, self.head_v = key_dim // n_head, d_model // n_head
        self.q_proj = nn.Linear(d_model, key_dim)
        self.k_proj = nn.Linear(d_model, key_dim)
        self.v_proj = nn.Linear(d_model, d_model)
        self.g_proj = nn.Linear(d_model, d_model)  # output gate
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.out_proj):
            init.xavier_uniform_(lin.weight, gain=2**-2.5 if lin is not self.out_proj else 2**-0.5)
            init.zeros_(lin.bias)
        (init.zeros_ if self.window else init.ones_)(self.norm_weight)

    def transfer_slots(self) -> dict[str, tuple[nn.Linear, slice]]:
        return {"o": (self.out_proj, slice(0, self.d_model)), "q": (self.q_proj, slice(0, self.q_proj.out_features)),
                "k": (self.k_proj, slice(0, self.k_proj.out_features)), "v": (self.v_proj, slice(0, self.d_model))}

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _heads(self, t: torch.Tensor, d: int) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.n_head, d).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: tuple | None = None, recurrent: bool = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (B, T, d_model); state: (S,) (with a window: (S, *window_attention's past)) from a previous call or
        None; `recurrent` uses the step-by-step form; position_embeddings: the source's rotary (cos, sin) for
        these positions, used with `window_rotary`. Returns (y (B, T, d_model), the new state)."""
        Bsz, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.head_k) * self.head_k**-0.5
        k, v = self._heads(self.k_proj(x), self.head_k), self._heads(self.v_proj(x), self.head_v)
        g = self.log_decay(x)
        s0 = None if state is None else state[0]
        out = None
        if not recurrent and self.fla_kernel and (fn := cuda_kernel(x, *self.fla_kernel)):
            out = self._fla(fn, q, k, v, g, s0)
        if out is None:
            out = (gla_recurrent if recurrent else gla_chunked)(q, k, v, g, s0, **({} if recurrent else {"chunk": self.chunk}))
        o, S = out
        y = rms_norm(o, self.norm_weight).transpose(1, 2).reshape(Bsz, T, -1) * F.silu(self.g_proj(x))
        if not self.window:
            return self.out_proj(y), (S,)
        qw, kw = rotate_window(q, k, position_embeddings) if self.window_rotary else (q, k)
        o_win, past = window_attention(qw, kw, v, self.window, None if state is None else state[1:],
                                       self.window_summary)
        return self.out_proj(y + o_win.transpose(1, 2).reshape(Bsz, T, -1)), (S, *past)

    def _fla(self, fn, q, k, v, g, s0):
        """flash-linear-attention's chunk kernel, (B, T, H, K) layout, scale already applied to q."""
        t = lambda a: a.transpose(1, 2).contiguous()  # noqa: E731
        g_full = g.expand(q.shape[0], -1, -1, q.shape[-1])
        res = try_kernel(fn, t(q), t(k), t(v), t(g_full), scale=1.0, initial_state=s0, output_final_state=True)
        return None if res is None else (res[0].transpose(1, 2), res[1])


class RetentionMixer(LinearAttentionMixer):
    """RetNet retention (Sun et al. 2023) without xPos (GPT-2's position embeddings are kept):
    decay gamma_h = 1 - 2^(-5 - h) per head, the same at every position. With one decay per head the
    intra-chunk decay is an (L, L) matrix, not (L, L, K), so longer chunks pay: 128 by default."""

    fla_kernel = ("fla.ops.gla", "chunk_gla")

    def __init__(self, d_model: int, n_head: int, chunk: int = 128, **kwargs):
        super().__init__(d_model, n_head, chunk=chunk, **kwargs)
        self.reset_mixer_parameters()

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.arange(self.n_head, dtype=torch.float32, device=x.device)
        gamma = 1 - torch.pow(2.0, -5.0 - h)
        return torch.log(gamma).view(1, -1, 1, 1).expand(1, -1, x.shape[1], 1)


class GLAMixer(LinearAttentionMixer):
    """Gated linear attention: per-token, per-key-channel decay ``g = logsigmoid(W2 W1 x + b) / gate_norm``
    from a rank-`gate_rank` projection. key_dim defaults to d_model // 2 as in the paper."""

    fla_kernel = ("fla.ops.gla", "chunk_gla")

    def __init__(self, d_model: int, n_head: int, key_dim: int | None = None, gate_rank: int = 16,
                 gate_norm: float = 16.0, **kwargs):
        super().__init__(d_model, n_head, key_dim=key_dim or d_model // 2, **kwargs)
        self.gate_norm = gate_norm
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False),
                                     nn.Linear(gate_rank, self.q_proj.out_features, bias=True))
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        super().reset_mixer_parameters()
        if hasattr(self, "gk_proj"):
            init.xavier_uniform_(self.gk_proj[0].weight, gain=2**-2.5)
            init.xavier_uniform_(self.gk_proj[1].weight, gain=2**-2.5)
            init.zeros_(self.gk_proj[1].bias)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        g = F.logsigmoid(self.gk_proj(x)) / self.gate_norm  # (B, T, K)
        return self._heads(g, self.head_k)


