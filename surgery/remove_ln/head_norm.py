"""A per-head QK-norm (Qwen3's and Gemma 3's `q_norm` / `k_norm`) that can be switched into a fake one with one
fixed scale per head.

Real:  RMS(x)  = x / rms_token,head(x) * weight     x (..., d_head): one head's query or key features
Fake:  fake(x) = x / sigma[head] * weight           sigma (heads,): each head's own fixed scale

The input holds the heads on `head_axis` of a (B, T, H, d_head) or (B, H, T, d_head) tensor (the family says which:
`Family.qk_head_axis`). While real, the norm keeps a moving average of each head's mean per-token rms (separately
for other tokens, the first position and end-of-text tokens, as `SwitchableLayerNorm` does per norm). A fixed
per-head scale folds into that head's rows of the query / key projection (`surgery.remove_ln.export`).
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.remove_ln.fake_ln import SwitchableLayerNorm, TokenContext


class SwitchableHeadNorm(SwitchableLayerNorm):
    """`SwitchableLayerNorm` of an RMSNorm applied to every head of a query or key tensor, with sigma per head.

    Buffers `sigma`, `sigma_first`, `sigma_eot`, `avg_std`, `avg_std_first`, `avg_std_eot` have shape (n_heads,).
    """

    def __init__(self, ln: nn.Module, n_heads: int, head_axis: int, context: TokenContext | None = None,
                 momentum: float = 0.9, gain_offset: float = 0.0):
        super().__init__(ln, context, momentum, gain_offset, n_scales=n_heads)
        if self.center:
            raise ValueError("a per-head QK-norm is an RMSNorm")
        if head_axis not in (-2, -3):
            raise ValueError(f"head_axis must be -2 (B, T, H, d) or -3 (B, H, T, d), got {head_axis}")
        self.n_heads, self.head_axis = n_heads, head_axis

    def tokens_by_head(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, H, 1) or (B, H, T, 1) -> (B, T, H)."""
        t = t.squeeze(-1)
        return t.transpose(-1, -2) if self.head_axis == -3 else t

    def _per_head(self, v: torch.Tensor) -> torch.Tensor:
        """(H,) or (B, T, H) -> broadcastable against the input (heads on `head_axis`, features last)."""
        if v.dim() == 1:
            return v.view(-1, *([1] * (-self.head_axis - 1)))
        return (v.transpose(-1, -2) if self.head_axis == -3 else v).unsqueeze(-1)

    @torch.no_grad()
    def _measure(self, rstd: torch.Tensor) -> None:
        r = self.tokens_by_head(rstd)
        _, _, member, counts = self.context.groups(r.shape[:-1], r.device)
        sums = member @ r.reshape(-1, r.shape[-1]).float().reciprocal()  # (3, H)
        self.context.pending.append((self, sums, counts, self.momentum))

    def inverse_sigma(self, x: torch.Tensor) -> torch.Tensor:
        """1 / sigma per head, broadcastable against `x`; per token too while special tokens keep their own."""
        if not self.has_specials:
            return self._per_head(self.sigma.reciprocal()).to(x.dtype)
        shape = self.tokens_by_head(x[..., :1]).shape[:-1]  # (B, T)
        first, eot, _, _ = self.context.groups(shape, x.device)
        sigma = torch.where((first & self.special_first.bool())[..., None], self.sigma_first, self.sigma)
        sigma = torch.where((eot & self.special_eot.bool())[..., None], self.sigma_eot, sigma)
        return self._per_head(sigma.reciprocal()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_fake:
            return self.weight * self.standardize(x)
        return x * self.inverse_sigma(x) * self.weight
