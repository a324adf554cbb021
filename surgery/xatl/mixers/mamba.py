"""The Mamba-1 selective-SSM mixer (Gu & Dao 2023) as a drop-in replacement for a block's attention.

Names follow mamba-ssm and `transformers.MambaMixer` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj),
except that out_proj has a bias so a GPT-2 attention output projection can be copied into it whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from surgery.errors import SurgeryError
from surgery.xatl.mixers.kernels import cuda_kernel, try_kernel
from surgery.xatl.mixers.scan import causal_conv1d, selective_scan_chunked, selective_scan_sequential


class MambaMixer(nn.Module):
    """Selective SSM. Input and output (B, T, d_model); state per sequence: the last `d_conv - 1` conv inputs
    (B, E, d_conv-1) and the SSM state (B, E, d_state), with E = expand * d_model: constant in T.

    Args:
        d_model: residual width. d_state: SSM state size N per channel. d_conv: causal conv width.
        expand: E / d_model. dt_rank: rank of the step-size projection (default ceil(d_model / 16)).
        chunk: chunk length of the CPU scan (default ceil(sqrt(T)): about 2 sqrt(T) vectorised steps).
        conv_init: "default" (PyTorch's Conv1d initialisation, as mamba-ssm) or "identity" (the causal conv
            passes each position's own input through: a value projection copied into in_proj reaches the scan
            unchanged rather than mixed with its neighbours at random).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, chunk: int | None = None, conv_init: str = "default"):
        super().__init__()
        if conv_init not in ("default", "identity"):
            raise SurgeryError(f"conv_init must be 'default' or 'identity', not {conv_init!r}")
        self.conv_init = conv_init
        self.d_model, self.d_state, self.d_conv, self.chunk = d_model, d_state, d_conv, chunk
        self.d_inner = E = expand * d_model
        self.dt_rank = R = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, d_state))
        self.D = nn.Parameter(torch.empty(E))
        self.A_log._no_weight_decay = True  # mamba-ssm's marker: decay would pull A towards -1 (see decays())
        self.out_proj = nn.Linear(E, d_model, bias=True)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation: S4D-real A, step sizes log-uniform in [dt_min, dt_max]."""
        E, N = self.A_log.shape
        init.copy_(self.A_log, torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        init.ones_(self.D)
        init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        for lin in (self.in_proj, self.x_proj, self.out_proj):
            init.normal_(lin.weight, std=0.02)
        init.zeros_(self.out_proj.bias)
        if self.conv_init == "identity":
            init.zeros_(self.conv1d.weight)
            init.ones_(self.conv1d.weight[:, :, -1])  # the last tap is the current position
        else:
            init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        init.zeros_(self.conv1d.bias)

    def transfer_slots(self) -> dict[str, tuple[nn.Linear, slice]]:
        """Where attention weights can go (Mamba-in-the-Llama): output projection, V -> x, K -> B, Q -> C.
        Each slot is (Linear, slice of its output rows)."""
        E, R, N = self.d_inner, self.dt_rank, self.d_state
        return {"o": (self.out_proj, slice(0, self.d_model)), "v": (self.in_proj, slice(0, E)),
                "k": (self.x_proj, slice(R, R + N)), "q": (self.x_proj, slice(R + N, R + 2 * N))}

    def forward(self, x: torch.Tensor, state: tuple | None = None, recurrent: bool = False):
        """x: (B, T, d_model); state: (conv, ssm) from a previous call or None. `recurrent` uses the
        step-by-step scan. Returns (y (B, T, d_model), new state)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        xc, conv_state = causal_conv1d(xs.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                       None if state is None else state[0])
        xc = F.silu(xc).transpose(1, 2)  # (B, T, E)
        dt, Bm, Cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())  # (E, N)
        y, ssm = None, None
        if state is None and not recurrent and (fn := cuda_kernel(x, "mamba_ssm.ops.selective_scan_interface",
                                                                  "selective_scan_fn")):
            out = try_kernel(fn, xc.transpose(1, 2).contiguous(), (dt @ self.dt_proj.weight.T).transpose(1, 2),
                             A, Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(), None, None,
                             delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=True)
            if out is not None:
                y, ssm = out[0].transpose(1, 2), out[1]
        if y is None:
            delta = F.softplus(self.dt_proj(dt))  # (B, T, E)
            a = torch.exp(delta[..., None] * A)  # (B, T, E, N)
            u = (delta * xc)[..., None] * Bm[:, :, None, :]
            h0 = None if state is None else state[1]
            # Without autograd the plain loop is faster on CPU (~1.7x); with it, the chunked scan (~1.8x).
            if recurrent or not torch.is_grad_enabled():
                y, ssm = selective_scan_sequential(a, u, Cm, h0)
            else:
                y, ssm = selective_scan_chunked(a, u, Cm, h0, chunk=self.chunk)
        y = (y + xc * self.D) * F.silu(z)
        return self.out_proj(y), (conv_state, ssm)
