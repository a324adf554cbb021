"""Scale uniformity at the norms whose input nothing else reads: QK-norms and post-sublayer norms.

A pre-norm's input is the residual stream, which the rest of the model reads too. A QK-norm's input (a head's
query or key) and a post-norm's input (a sublayer's output) are read by the norm alone, so while the norm is real
the model's output does not depend on each token's scale there. When the norm goes fake that scale starts to
matter: a key twice the usual size doubles its attention logits. `ScaleUniformity` pulls each token's scale at
those inputs towards the mean scale (per norm, and per head for a per-head QK-norm) from the start of training,
while it is still nearly free, so that the fixed scale fits every token when the norm goes. It is the final-norm
auxiliary loss of Baroni et al. (2025) (`surgery.remove_ln.module.std_uniformity_loss`) carried to these points,
in relative units so that norms of different scales weigh alike.
"""

from __future__ import annotations

import torch

from surgery.remove_ln.fake_ln import SwitchableLayerNorm
from surgery.remove_ln.head_norm import SwitchableHeadNorm

INPUT_ONLY_KINDS = ("ln_q", "ln_k", "ln_attn_out", "ln_mlp_out")  # the kinds whose input only the norm reads


class ScaleUniformity:
    """Keeps the training forward's inputs of the points of `kinds` and turns them into a loss.

    loss(keep): mean over those norms (and heads) of the kept tokens' mean squared relative deviation of their rms
    from the (detached) mean rms; keep (B, T) bool. 0 when the model has no such norm.
    """

    def __init__(self, points: dict[str, SwitchableLayerNorm], kinds=INPUT_ONLY_KINDS):
        self.norms = {name: ln for name, ln in points.items() if name.rsplit(".", 1)[-1] in kinds}
        self.inputs: dict[str, torch.Tensor] = {}
        for name, ln in self.norms.items():
            ln.register_forward_pre_hook(lambda module, args, name=name: self._keep(name, module, args[0]))

    def _keep(self, name: str, module: SwitchableLayerNorm, x: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self.inputs[name] = x

    def _scales(self, name: str) -> torch.Tensor:
        """(B, T, k): each token's rms at this norm's input, per head (k heads) or for the whole input (k = 1)."""
        ln = self.norms[name]
        rms = (self.inputs[name].float().pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        return ln.tokens_by_head(rms) if isinstance(ln, SwitchableHeadNorm) else rms

    def loss(self, keep: torch.Tensor) -> torch.Tensor:
        w = keep.float()[..., None]  # (B, T, 1)
        n = w.sum().clamp_min(1.0)
        terms = []
        for name in self.inputs:
            s = self._scales(name)
            mean = ((s * w).sum((0, 1)) / n).detach()  # (k,)
            terms.append(((s / mean - 1).pow(2) * w).sum((0, 1)).div(n).mean())
        self.inputs = {}
        return torch.stack(terms).mean() if terms else keep.new_zeros((), dtype=torch.float32)
