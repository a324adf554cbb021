"""The Mamba-2 (SSD) mixer (Dao & Gu 2024) as a drop-in replacement for a block's attention.

SSD is causal linear attention with one scalar decay per head: per head h, with state S of shape (N, P),
``S_t = exp(dt_t A_h) S_{t-1} + (dt_t B_t)^T x_t``, ``y_t = C_t S_t + D_h x_t``: C plays the query, B the key,
x the value (`surgery.xatl.mixers.scan.ssd_chunked` computes it, `gla_recurrent` step by step). Layout as in
Mamba-in-the-Llama's Mamba-2 (`mamba2/hybrid_wrapper.py`): `in_proj` rows [z, x, B, C, dt], x and B with
`n_kv_head` groups (a grouped-query source's K/V heads, repeated to the heads after the conv), C with one group per
head, `d_state` = head width, so a source's V, K, Q fit x, B, C whole; a causal depthwise conv and SiLU over
[x, B, C]; the gated RMSNorm of Mamba-2 (y * silu(z), normalised per head) before `out_proj`.
Parameter names are those of `transformers.Mamba2Mixer` (in_proj, conv1d, dt_bias, A_log, D, norm.weight,
out_proj); with n_kv_head = n_head the two load each other's weights unchanged.

With `window` > 0 the mixer also attends exactly (softmax) to its last `window` tokens with the pre-conv C, B, x
as query, key and value, added before `out_proj`, and the SSM branch starts at zero (its norm gain): a mixer given
a source's Q/K/V/O starts as the source's attention cut to the window (as the linear-attention mixers do).

On CUDA the scan runs mamba-ssm's `mamba_chunk_scan_combined` if it imports, else flash-linear-attention's
`chunk_simple_gla` (the same recurrence); `scan_path` says which ran last, and a kernel failure falls back to the
PyTorch path with a warning.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from surgery.errors import SurgeryError
from surgery.xatl.mixers.kernels import cuda_kernel, try_kernel
from surgery.xatl.mixers.scan import causal_conv1d, gla_recurrent, rotate_window, ssd_chunked, window_attention

MAMBA_SSM = ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
FLA_SIMPLE_GLA = ("fla.ops.simple_gla", "chunk_simple_gla")


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated norm: ``rms_norm(y * silu(z))`` over groups of `group_size` channels, times `weight`."""

    def __init__(self, width: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.flatten(-2) * self.weight


class Mamba2Mixer(nn.Module):
    """SSD mixer. Input and output (B, T, d_model); state per sequence: the last `d_conv - 1` conv inputs
    (B, conv width, d_conv - 1) and the SSM state (B, H, N, P) (plus a window's keys and values): constant in T.

    Args:
        d_model: residual width. n_head: heads H (C groups). n_kv_head: x/B groups G (default H; H % G == 0).
        d_state: N (default the head width P = d_model / H, so a source's Q and K fit C and B whole).
        d_conv: causal conv width. chunk: chunk length of the chunked scan.
        conv_init: "default" (PyTorch's Conv1d initialisation) or "identity" (the conv passes each position's
            own input through, so copied V/K/Q reach the scan unmixed).
        window: tokens each position also attends to by softmax (itself included); 0: none.
        window_summary: the tokens that have left the window join that softmax as one entry, their mean key and
            value (`surgery.xatl.mixers.scan.window_attention`).
        window_rotary: the window's query and key are rotated by the position embeddings the decoder layer hands
            attention, as a rotary source's attention rotates its own (Pythia, Llama-style).
        dt_min, dt_max: range of the initial step sizes (log-uniform). norm_eps: the gated norm's epsilon.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, d_state: int | None = None,
                 d_conv: int = 4, chunk: int = 64, conv_init: str = "default", window: int = 0,
                 window_summary: bool = False, window_rotary: bool = False, dt_min: float = 1e-3, dt_max: float = 0.1, norm_eps: float = 1e-5):
        super().__init__()
        G = n_kv_head or n_head
        if d_model % n_head or n_head % G:
            raise SurgeryError(f"mamba2: d_model={d_model} must divide by n_head={n_head} and n_head by "
                               f"n_kv_head={G}; set n_kv_head to a divisor of n_head")
        if conv_init not in ("default", "identity"):
            raise SurgeryError(f"conv_init must be 'default' or 'identity', not {conv_init!r}")
        if window < 0:
            raise SurgeryError(f"window={window}: give the number of recent tokens to attend to exactly, or 0 for none")
        if (window_summary or window_rotary) and not window:
            raise SurgeryError("window_summary and window_rotary act on the softmax window: set window > 0 too")
        self.window_summary, self.window_rotary = window_summary, window_rotary
        self.d_model, self.n_head, self.n_kv_head = d_model, n_head, G
        self.head_dim = P = d_model // n_head
        self.d_state = N = d_state or P
        self.d_conv, self.chunk, self.conv_init, self.window = d_conv, chunk, conv_init, window
        self.dt_min, self.dt_max = dt_min, dt_max
        self.d_inner = n_head * P
        self.widths = {"z": self.d_inner, "x": G * P, "B": G * N, "C": n_head * N, "dt": n_head}
        conv_dim = G * P + G * N + n_head * N
        self.in_proj = nn.Linear(d_model, sum(self.widths.values()), bias=True)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(n_head))
        self.A_log = nn.Parameter(torch.empty(n_head))
        self.D = nn.Parameter(torch.empty(n_head))
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, P, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=True)
        self.scan_path = "torch"
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        """Mamba-2's initialisation: A_h = h + 1 (h = 0..H-1), D = 1, step sizes log-uniform in [dt_min, dt_max]."""
        H = self.n_head
        init.copy_(self.A_log, torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        init.ones_(self.D)
        dt = torch.exp(torch.rand(H) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=1e-4)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        for lin in (self.in_proj, self.out_proj):
            init.normal_(lin.weight, std=0.02)
            init.zeros_(lin.bias)
        if self.conv_init == "identity":
            init.zeros_(self.conv1d.weight)
            init.ones_(self.conv1d.weight[:, :, -1])  # the last tap is the current position
        else:
            init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        init.zeros_(self.conv1d.bias)
        (init.zeros_ if self.window else init.ones_)(self.norm.weight)

    def _rows(self, name: str) -> slice:
        start = 0
        for key, width in self.widths.items():
            if key == name:
                return slice(start, start + width)
            start += width
        raise KeyError(name)

    def transfer_slots(self) -> dict[str, tuple[nn.Linear, slice]]:
        """Mamba-in-the-Llama's mapping: V -> x, K -> B (both with n_kv_head groups), Q -> C, O -> out_proj.
        Each slot is (Linear, slice of its output rows)."""
        return {"o": (self.out_proj, slice(0, self.d_model)), "v": (self.in_proj, self._rows("x")),
                "k": (self.in_proj, self._rows("B")), "q": (self.in_proj, self._rows("C"))}

    def _heads(self, t: torch.Tensor, groups: int) -> torch.Tensor:
        """(B, T, groups * d) -> (B, H, T, d), each group repeated for the n_head // groups heads that share it."""
        t = t.unflatten(-1, (groups, -1)).transpose(1, 2)
        return t.repeat_interleave(self.n_head // groups, dim=1) if groups != self.n_head else t

    def forward(self, u: torch.Tensor, state: tuple | None = None, recurrent: bool = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None):
        """u: (B, T, d_model); state: (conv, S) (with a window: (conv, S, *window_attention's past)) from a previous
        call or None; `recurrent` steps through time; position_embeddings: the source's rotary (cos, sin) for
        these positions, used with `window_rotary`. Returns (y (B, T, d_model), the new state)."""
        Bsz, T, _ = u.shape
        xbc = [self.widths[k] for k in "xBC"]
        z, xBC, dt = self.in_proj(u).split([self.widths["z"], sum(xbc), self.n_head], dim=-1)
        conv, conv_state = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                         None if state is None else state[0])
        x, Bm, Cm = F.silu(conv.transpose(1, 2)).split(xbc, dim=-1)
        x, Bm, Cm = self._heads(x, self.n_kv_head), self._heads(Bm, self.n_kv_head), self._heads(Cm, self.n_head)
        dt = F.softplus(dt + self.dt_bias).transpose(1, 2)[..., None]  # (B, H, T, 1)
        A = -torch.exp(self.A_log.float())
        s0 = None if state is None else state[1]
        step = recurrent or T == 1  # decoding: the recurrence (the chunked form's masks cost more for one token)
        out = None if step else self._cuda_scan(x, dt, A, Bm, Cm, s0)
        if out is None:
            self.scan_path = "torch"
            g = dt * A[:, None, None]  # log decay, (B, H, T, 1), <= 0
            o, S = (gla_recurrent(Cm, Bm * dt, x, g, s0) if step
                    else ssd_chunked(Cm, Bm * dt, x, g[..., 0], s0, chunk=self.chunk))
            out = (o + self.D[:, None, None] * x, S)
        y, S = out
        y = self.norm(y.transpose(1, 2).reshape(Bsz, T, self.d_inner), z)
        if not self.window:
            return self.out_proj(y), (conv_state, S)
        xr, Br, Cr = xBC.split(xbc, dim=-1)
        q, k = self._heads(Cr, self.n_head), self._heads(Br, self.n_kv_head)
        if self.window_rotary:
            q, k = rotate_window(q, k, position_embeddings)
        o_win, past = window_attention(q * self.d_state**-0.5, k, self._heads(xr, self.n_kv_head),
                                       self.window, None if state is None else state[2:], self.window_summary)
        return self.out_proj(y + o_win.transpose(1, 2).reshape(Bsz, T, -1)), (conv_state, S, *past)

    def _cuda_scan(self, x, dt, A, Bm, Cm, s0):
        """The scan by a CUDA kernel, or None (CPU tensors, no kernel, or a kernel failure: then a warning).
        Shapes as in forward: x (B, H, T, P), dt (B, H, T, 1), Bm, Cm (B, H, T, N), s0 (B, H, N, P) or None.
        Returns (y with the D term (B, H, T, P), final state (B, H, N, P))."""
        t = lambda a: a.transpose(1, 2).contiguous()  # noqa: E731 - (B, H, T, .) -> (B, T, H, .)
        if fn := cuda_kernel(x, *MAMBA_SSM):
            res = try_kernel(fn, t(x), t(dt)[..., 0], A, t(Bm), t(Cm), self.chunk, D=self.D,
                             initial_states=None if s0 is None else s0.transpose(-1, -2).contiguous(),
                             return_final_states=True)
            if res is not None:
                self.scan_path = "mamba_ssm"
                return res[0].transpose(1, 2), res[1].transpose(-1, -2)
        if fn := cuda_kernel(x, *FLA_SIMPLE_GLA):
            g = (dt * A[:, None, None])[..., 0].transpose(1, 2).contiguous()  # (B, T, H)
            res = try_kernel(fn, t(Cm), t(Bm * dt), t(x), g, scale=1.0, initial_state=s0,
                             output_final_state=True)
            if res is not None:
                self.scan_path = "fla"
                return res[0].transpose(1, 2) + self.D[:, None, None] * x, res[1]
        if x.is_cuda:
            warnings.warn("mamba2: no CUDA scan kernel ran (install mamba-ssm or flash-linear-attention); "
                          "using the PyTorch path", stacklevel=3)
        return None
