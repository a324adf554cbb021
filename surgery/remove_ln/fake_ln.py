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
    """What the LNs of one model share: per-batch token facts, and their pending std measurements.

    The training module sets `eot_mask` (B, T) bool before each forward (None: no EOT tokens); the masks
    every LN needs are derived from it once per batch (`groups`). Real LNs measuring in training mode
    only record their batch sums; `flush()` folds every recorded measurement into the moving averages
    in a few vectorised ops (and one all-reduce under DDP). Call it after each training forward, on every
    rank; setting `eot_mask` and `go_fake` flush too.
    """

    def __init__(self) -> None:
        self._eot_mask: torch.Tensor | None = None
        self._groups: dict = {}
        self.pending: list[tuple["SwitchableLayerNorm", torch.Tensor, torch.Tensor, float]] = []

    @property
    def eot_mask(self) -> torch.Tensor | None:
        return self._eot_mask

    @eot_mask.setter
    def eot_mask(self, mask: torch.Tensor | None) -> None:
        self.flush()
        self._eot_mask, self._groups = mask, {}

    def groups(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, ...]:
        """For tokens of batch shape `shape` (B, T): the first-position and EOT masks (B, T) bool, the
        membership matrix (3, B*T) float of [other tokens; first position; EOT tokens] and its row sums."""
        key = (tuple(shape), device)
        if key not in self._groups:
            first = torch.zeros(shape, dtype=torch.bool, device=device)
            first[..., 0] = True
            eot = self._eot_mask
            eot = torch.zeros_like(first) if eot is None or eot.shape != first.shape else eot.to(device) & ~first
            member = torch.stack([~(first | eot), first, eot]).reshape(3, -1).float()
            self._groups[key] = first, eot, member, member.sum(1)
        return self._groups[key]

    @torch.no_grad()
    def flush(self) -> None:
        """Fold the pending measurements into each LN's moving averages, in recording order."""
        while self.pending:
            seen: set[int] = set()
            n = 0
            while n < len(self.pending) and id(self.pending[n][0]) not in seen:  # one update per LN per round
                seen.add(id(self.pending[n][0]))
                n += 1
            batch, self.pending = self.pending[:n], self.pending[n:]
            _fold(batch)


def _fold(batch: list) -> None:
    """avg <- mean where avg is still 0, else momentum * avg + (1 - momentum) * mean; groups with no token
    this batch keep their average. All LNs in `batch` are distinct."""
    lns = [b[0] for b in batch]
    stats = torch.cat([torch.stack([b[1] for b in batch]), torch.stack([b[2] for b in batch])], 1)  # (P, 6)
    # sums and counts, all-reduced across ranks so every rank removes with the same sigma
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    sums, counts = stats[:, :3], stats[:, 3:]
    mean = sums / counts.clamp_min(1.0)
    bufs = [t for ln in lns for t in (ln.avg_std, ln.avg_std_first, ln.avg_std_eot)]
    old = torch.stack(bufs).view(-1, 3)
    m = torch.tensor([b[3] for b in batch], device=old.device).unsqueeze(1)
    new = torch.where(old == 0, mean, old * m + (1 - m) * mean)
    torch._foreach_copy_(bufs, list(torch.where(counts > 0, new, old).view(-1).unbind()))
    torch._foreach_add_([ln.avg_count for ln in lns], 1.0)


def per_token_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(…, d) -> (…,): the standard deviation LayerNorm divides by, sqrt(var + eps)."""
    return (x.var(-1, unbiased=False) + eps).sqrt()


class SwitchableLayerNorm(nn.Module):
    """Drop-in for `nn.LayerNorm` (same weight/bias) that can be made fake.

    Buffers (all scalars): `fake` (0/1), `sigma`, `sigma_first`, `sigma_eot`, `special_first` and
    `special_eot` (0/1: whether the first position / EOT tokens still use their own sigma), and the moving
    averages `avg_std`, `avg_std_first`, `avg_std_eot` with `avg_count` (number of updates; 0 = not yet
    measured), current once `context.flush()` has run. The forward pass branches on Python copies of the
    0/1 buffers (kept in step by `go_fake`, `drop_specials` and `load_state_dict`), so it never waits for a
    device-to-host copy.
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
        self._sync_flags()

    def _sync_flags(self) -> None:
        self.is_fake = bool(self.fake)
        self.has_specials = bool(self.special_first) or bool(self.special_eot)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    @torch.no_grad()
    def _measure(self, rstd: torch.Tensor) -> None:
        """Record this batch's per-token std (1 / rstd of LayerNorm) summed over other tokens, the first
        position and EOT tokens; `context.flush()` folds it into the averages."""
        _, _, member, counts = self.context.groups(rstd.shape[:-1], rstd.device)
        sums = member @ rstd.reshape(-1).float().reciprocal()
        self.context.pending.append((self, sums, counts, self.momentum))

    def go_fake(self, sigma: float | None = None, special_first: bool = False, special_eot: bool = False) -> None:
        """Freeze `sigma` (default: the moving average) and switch to the fake LN."""
        self.context.flush()
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
        self._sync_flags()

    def drop_specials(self, first: bool = False, eot: bool = False) -> None:
        """Stop giving the first position / EOT tokens their own sigma: they use `sigma` from now on."""
        if first:
            self.special_first.fill_(0.0)
        if eot:
            self.special_eot.fill_(0.0)
        self._sync_flags()

    def standardize(self, x: torch.Tensor, *also: "SwitchableLayerNorm") -> torch.Tensor:
        """(x - mean) / std_token, no affine, for a real LN; measures the std for this LN and for the
        real LNs `also` reading the same input (one pass for all of them)."""
        if self.training and self.track:
            out, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, self.eps)
            for ln in (self, *also):
                if ln.track:
                    ln._measure(rstd.detach())
            return out
        return F.layer_norm(x, x.shape[-1:], None, None, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_fake:
            if self.training and self.track:
                out, _, rstd = torch.native_layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
                self._measure(rstd.detach())
                return out
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        centered = x - x.mean(-1, keepdim=True)
        if self.has_specials:
            first, eot, _, _ = self.context.groups(x.shape[:-1], x.device)
            sigma = torch.where(first & self.special_first.bool(), self.sigma_first, self.sigma)
            sigma = torch.where(eot & self.special_eot.bool(), self.sigma_eot, sigma)
            return torch.addcmul(self.bias, centered / sigma.unsqueeze(-1).to(x.dtype), self.weight)
        return torch.addcmul(self.bias, centered, self.weight / self.sigma.to(x.dtype))

    def extra_repr(self) -> str:
        state = f"fake, sigma={float(self.sigma):.4g}" if self.is_fake else f"real, avg_std={float(self.avg_std):.4g}"
        return f"{self.weight.shape[0]}, {state}"


class SplitQKVInput(nn.Module):
    """GPT-2's fused `c_attn` (Conv1D d -> 3d) reading the raw residual stream through two LNs:
    one for the query/key columns, one for the value columns. Replaces `ln_1` + `c_attn`.

    Input (B, T, d) residual; output (B, T, 3d) = [LN_qk(x) W_qk + b_qk, LN_v(x) W_v + b_v].
    While both LNs are real, or both fake with no special tokens, they differ only in their affines: z is
    computed once, and on batches of more than 3d tokens the affines are folded into one matmul (the cost of
    plain GPT-2's `ln_1` + `c_attn`); otherwise two matmuls.
    """

    def __init__(self, c_attn: nn.Module, ln_qk: SwitchableLayerNorm, ln_v: SwitchableLayerNorm):
        super().__init__()
        self.c_attn, self.ln_qk, self.ln_v = c_attn, ln_qk, ln_v
        self.d = c_attn.weight.shape[0]
        self.fold_min_tokens = 3 * self.d  # fold only when a batch has more tokens than c_attn has outputs

    def _shared_input(self, x: torch.Tensor):
        """(z, gain_qk, gain_v) when both LNs are `z * gain + bias` of one z: both real (z standardized
        once), or both fake without special tokens (z centered); None while they differ."""
        qk, v = self.ln_qk, self.ln_v
        if not qk.is_fake and not v.is_fake:
            return qk.standardize(x, v), qk.weight, v.weight
        if qk.is_fake and v.is_fake and not qk.has_specials and not v.has_specials:
            return x - x.mean(-1, keepdim=True), qk.weight / qk.sigma, v.weight / v.sigma
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, d = self.c_attn.weight, self.c_attn.bias, self.d
        shared = self._shared_input(x)
        if shared is not None and x.numel() >= self.fold_min_tokens * d:
            # one matmul as in plain GPT-2: the two LN affines folded into c_attn (O(d * 3d) extra work)
            z, g_qk, g_v = shared
            w3 = w.view(d, 3, d)  # input dim, (q, k, v), output dim
            w_eff = (w3 * torch.stack([g_qk, g_qk, g_v], 1).unsqueeze(-1)).view(d, 3 * d)
            b_ln = torch.stack([self.ln_qk.bias, self.ln_qk.bias, self.ln_v.bias], 1)
            b_eff = b + torch.einsum("ij,ijk->jk", b_ln, w3).reshape(3 * d)
            return torch.addmm(b_eff, z.reshape(-1, d), w_eff).view(*x.shape[:-1], 3 * d)
        if shared is not None:  # two affines of one z (O(tokens * d) extra work)
            z, g_qk, g_v = shared
            x_qk, x_v = torch.addcmul(self.ln_qk.bias, z, g_qk), torch.addcmul(self.ln_v.bias, z, g_v)
        else:
            x_qk, x_v = self.ln_qk(x), self.ln_v(x)
        # split(), not slicing: the backward of a slice fills a zero gradient of the whole weight per slice
        (w_qk, w_v), (b_qk, b_v) = w.split([2 * d, d], 1), b.split([2 * d, d])
        qk = torch.addmm(b_qk, x_qk.reshape(-1, d), w_qk)
        v = torch.addmm(b_v, x_v.reshape(-1, d), w_v)
        return torch.cat([qk, v], dim=-1).view(*x.shape[:-1], 3 * d)
