"""Modules through which several layers read one set of weights.

A layer that owns a shared block registers the shared module as its child, so the weight is stored once, under that
layer's name; every other layer of the group holds it unregistered, so `parameters()`, optimizers and `state_dict`
see each weight once and a gradient step changes every use.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.families import in_out_weight


def _hold(module: nn.Module, name: str, target: nn.Module, owner: bool) -> None:
    if owner:
        setattr(module, name, target)  # registered: a parameter of the model, saved under this layer's name
    else:
        module.__dict__[name] = target  # plain attribute: reachable, but not a child


class SharedProjection(nn.Module):
    """One layer's view of a projection (nn.Linear or GPT-2's Conv1D) that several layers share:

        y = base(x) + (x @ lora_a) @ lora_b + bias_delta        x (..., in) -> y (..., out)

    `lora_a` (in, r), `lora_b` (r, out) and `bias_delta` (out,; when the base has a bias) are this layer's own and
    exist only with relaxation (rank r > 0): the per-layer low-rank deltas of Relaxed Recursive Transformers.
    """

    def __init__(self, base: nn.Module, owner: bool, rank: int = 0):
        super().__init__()
        _hold(self, "base", base, owner)
        d_in, d_out = in_out_weight(base).shape
        self.rank = min(rank, d_in, d_out)
        weight = in_out_weight(base)
        if self.rank:
            self.lora_a = nn.Parameter(torch.zeros(d_in, self.rank, dtype=weight.dtype))
            self.lora_b = nn.Parameter(torch.zeros(self.rank, d_out, dtype=weight.dtype))
            has_bias = getattr(base, "bias", None) is not None
            self.bias_delta = nn.Parameter(torch.zeros(d_out, dtype=weight.dtype)) if has_bias else None
        else:
            self.lora_a = self.lora_b = self.bias_delta = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rank:
            y = y + (x @ self.lora_a) @ self.lora_b
        if self.bias_delta is not None:
            y = y + self.bias_delta
        return y

    @torch.no_grad()
    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's weight as (in, out) and its bias (None without one): what a vanilla layer holds."""
        weight = in_out_weight(self.base).clone()
        bias = self.base.bias.clone() if getattr(self.base, "bias", None) is not None else None
        if self.rank:
            weight += self.lora_a @ self.lora_b
        if self.bias_delta is not None:
            bias += self.bias_delta
        return weight, bias

    @torch.no_grad()
    def relax_towards(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set the deltas to the best rank-r approximation (truncated SVD) of (weight - shared weight), and the bias
        delta to (bias - shared bias): at full rank the layer computes `weight`, `bias` exactly (up to rounding)."""
        if not self.rank:
            return
        diff = (weight.double() - in_out_weight(self.base).double())
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        root = s[: self.rank].sqrt()
        self.lora_a.copy_(u[:, : self.rank] * root)
        self.lora_b.copy_(root[:, None] * vh[: self.rank])
        if self.bias_delta is not None and bias is not None:
            self.bias_delta.copy_(bias - self.base.bias)


class SharedModule(nn.Module):
    """A layer's handle on a whole module another layer owns (a norm, or a mixture-of-experts MLP): calls it."""

    def __init__(self, target: nn.Module):
        super().__init__()
        _hold(self, "target", target, owner=False)

    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)
