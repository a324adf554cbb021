"""A mixture-of-experts MLP made from a pretrained model's MLPs (WideNet's wider shared block)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoEMLP(nn.Module):
    """E expert MLPs (each the family's own MLP module, (B, T, D) -> (B, T, D)) behind a linear router (D -> E).

    Each token goes to its top-k experts; their outputs are summed with the router's softmax probabilities
    renormalized over the k chosen. In training mode every forward appends the Switch Transformer load-balancing
    loss, E * sum_e f_e * P_e (f_e: share of the routing choices that went to expert e, P_e: the mean router
    probability of e; 1 when balanced), to `aux_losses`; `pop_aux_losses` returns and clears them.
    """

    def __init__(self, experts: list[nn.Module], d_model: int, top_k: int = 1):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(d_model, len(experts), bias=False)
        self.top_k = top_k
        self.aux_losses: list[torch.Tensor] = []
        self.last_routing: torch.Tensor | None = None  # (N, k) expert ids of the last forward's tokens

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = self.router(flat).float().softmax(-1)  # (N, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel():
                y = expert(flat[rows][None])[0]
                out = out.index_add(0, rows, y * weights[rows, slot, None])
        self.last_routing = top_i.detach()
        if self.training:
            n_experts = len(self.experts)
            share = F.one_hot(top_i, n_experts).float().sum(1).mean(0) / self.top_k  # f_e, (E,)
            self.aux_losses.append(n_experts * (share * probs.mean(0)).sum())
        return out.reshape(x.shape)

    def pop_aux_losses(self) -> list[torch.Tensor]:
        losses, self.aux_losses = self.aux_losses, []
        return losses
