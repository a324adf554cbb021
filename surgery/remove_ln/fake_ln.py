"""A LayerNorm that can be switched, once, into a *fake* LayerNorm with a fixed scale.

Real:  LN(x)   = (x - mean(x)) / std_token(x) * weight + bias
Fake:  fake(x) = (x - mean(x)) / sigma         * weight + bias

`sigma` is a scalar per LN (optionally with separate scalars for the first position and for
end-of-text tokens during the transition). While real, the LN keeps a moving average of the mean
per-token std of its input; when it goes fake, `sigma` is frozen at that average (or at a
calibration-table value). All of this state is in buffers, so it lives in every checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class TokenContext:
    """Per-batch token facts the fake LNs read: which positions hold end-of-text tokens.

    The training module sets `eot_mask` (B, T) bool before each forward; None means no EOT tokens.
    """

    def __init__(self) -> None:
        self.eot_mask: torch.Tensor | None = None


def per_token_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(…, d) -> (…,): the standard deviation LayerNorm divides by, sqrt(var + eps)."""
    return (x.var(-1, unbiased=False) + eps).sqrt()


class SwitchableLayerNorm(nn.Module):
    """Drop-in for `nn.LayerNorm` (same weight/bias) that can be made fake.

    Buffers (all scalars): `fake` (0/1), `sigma`, `sigma_first`, `sigma_eot`, `special_first` and
    `special_eot` (0/1: whether the first position / EOT tokens still use their own sigma), and the moving averages `avg_std`,
    `avg_std_first`, `avg_std_eot` with `avg_count` (number of updates; 0 = not yet measured).
    """

    def __init__(self, ln: nn.LayerNorm, context: TokenContext | None = None, momentum: float = 0.9):
        super().__init__()
        self.weight = nn.Parameter(ln.weight.detach().clone())
        self.bias = nn.Parameter(ln.bias.detach().clone())
        self.eps = ln.eps
        self.momentum = momentum
        self.context = context or TokenContext()
        self.track = True  # update the moving averages on training forwards while real
        for name in ("fake", "sigma", "sigma_first", "sigma_eot", "special_first", "special_eot", "avg_std", "avg_std_first", "avg_std_eot", "avg_count"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float32))

    @property
    def is_fake(self) -> bool:
        return bool(self.fake)

    def _masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) bool masks of the first position and of EOT tokens."""
        first = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        first[..., 0] = True
        eot = self.context.eot_mask
        eot = torch.zeros_like(first) if eot is None or eot.shape != first.shape else eot.to(x.device) & ~first
        return first, eot

    @torch.no_grad()
    def _update_averages(self, x: torch.Tensor) -> None:
        std = per_token_std(x.float(), self.eps)
        first, eot = self._masks(x)
        rest = ~(first | eot)
        # sums and counts, all-reduced across ranks so every rank removes with the same sigma
        stats = torch.stack([
            (std * rest).sum(), rest.sum(), (std * first).sum(), first.sum(), (std * eot).sum(), eot.sum()
        ]).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        means = [stats[i] / stats[i + 1] if stats[i + 1] > 0 else None for i in (0, 2, 4)]
        for avg, mean in zip((self.avg_std, self.avg_std_first, self.avg_std_eot), means):
            if mean is None:
                continue
            if self.avg_count == 0 or avg == 0:
                avg.copy_(mean)
            else:
                avg.mul_(self.momentum).add_((1 - self.momentum) * mean)
        self.avg_count += 1

    def go_fake(self, sigma: float | None = None, special_first: bool = False, special_eot: bool = False) -> None:
        """Freeze `sigma` (default: the moving average) and switch to the fake LN."""
        if self.avg_count == 0 and sigma is None:
            raise RuntimeError("no std measured yet: run calibration or training forwards before going fake")
        self.sigma.fill_(float(sigma) if sigma is not None else float(self.avg_std))
        first = float(self.avg_std_first) if self.avg_std_first > 0 else float(self.sigma)
        eot = float(self.avg_std_eot) if self.avg_std_eot > 0 else float(self.sigma)
        self.sigma_first.fill_(first)
        self.sigma_eot.fill_(eot)
        self.special_first.fill_(float(special_first))
        self.special_eot.fill_(float(special_eot))
        self.fake.fill_(1.0)

    @property
    def has_specials(self) -> bool:
        return bool(self.special_first) or bool(self.special_eot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake:
            if self.training and self.track:
                self._update_averages(x)
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        centered = x - x.mean(-1, keepdim=True)
        if self.has_specials:
            first, eot = self._masks(x)
            sigma = torch.where(first & self.special_first.bool(), self.sigma_first, self.sigma)
            sigma = torch.where(eot & self.special_eot.bool(), self.sigma_eot, sigma)
            return centered / sigma.unsqueeze(-1).to(x.dtype) * self.weight + self.bias
        return centered * (1.0 / self.sigma).to(x.dtype) * self.weight + self.bias

    def extra_repr(self) -> str:
        state = f"fake, sigma={float(self.sigma):.4g}" if self.fake else f"real, avg_std={float(self.avg_std):.4g}"
        return f"{self.weight.shape[0]}, {state}"


class SplitQKVInput(nn.Module):
    """GPT-2's fused `c_attn` (Conv1D d -> 3d) reading the raw residual stream through two LNs:
    one for the query/key columns, one for the value columns. Replaces `ln_1` + `c_attn`.

    Input (B, T, d) residual; output (B, T, 3d) = [LN_qk(x) W_qk + b_qk, LN_v(x) W_v + b_v].
    """

    def __init__(self, c_attn: nn.Module, ln_qk: SwitchableLayerNorm, ln_v: SwitchableLayerNorm):
        super().__init__()
        self.c_attn, self.ln_qk, self.ln_v = c_attn, ln_qk, ln_v
        self.d = c_attn.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, d = self.c_attn.weight, self.c_attn.bias, self.d
        qk = torch.addmm(b[: 2 * d], self.ln_qk(x).reshape(-1, d), w[:, : 2 * d])
        v = torch.addmm(b[2 * d :], self.ln_v(x).reshape(-1, d), w[:, 2 * d :])
        return torch.cat([qk, v], dim=-1).view(*x.shape[:-1], 3 * d)
