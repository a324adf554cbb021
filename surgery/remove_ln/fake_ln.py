"""A norm (LayerNorm or RMSNorm) that can be switched, once, into a *fake* norm with a fixed scale.

Real LayerNorm:  LN(x)   = (x - mean(x)) / std_token(x) * weight + bias
Fake LayerNorm:  fake(x) = (x - mean(x)) / sigma         * weight + bias
Real RMSNorm:    RMS(x)  = x / rms_token(x) * weight      (rms = sqrt(mean(x^2) + eps), computed in fp32)
Fake RMSNorm:    fake(x) = x / sigma * weight             (no centering: the residual stream is linear anyway)

`sigma` is a scalar per norm (optionally with separate scalars for the first position and for
end-of-text tokens during the transition). While real, the LN keeps a moving average of the mean
per-token std of its input; when it goes fake, `sigma` is frozen at that average (or at a
calibration-table value). All of this state is in buffers, so it lives in every checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from surgery.families import norm_eps, norm_kind


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
    this batch keep their average. All LNs in `batch` are distinct. Each entry's sums are (3, k): k scale slots
    (1 for a norm with one sigma, the heads of a `SwitchableHeadNorm`), for [other; first; EOT] tokens."""
    lns = [b[0] for b in batch]
    sizes = [b[1].numel() for b in batch]
    sums = torch.cat([b[1].reshape(-1) for b in batch])
    counts = torch.cat([b[2].reshape(3, 1).expand(3, n // 3).reshape(-1) for b, n in zip(batch, sizes)])
    stats = torch.cat([sums, counts])
    # sums and counts, all-reduced across ranks so every rank removes with the same sigma
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    sums, counts = stats.split(len(sums))
    mean = sums / counts.clamp_min(1.0)
    bufs = [t for ln in lns for t in (ln.avg_std, ln.avg_std_first, ln.avg_std_eot)]
    old = torch.cat([t.reshape(-1) for t in bufs])
    m = torch.repeat_interleave(torch.tensor([b[3] for b in batch], device=old.device), torch.tensor(sizes, device=old.device))
    new = torch.where(old == 0, mean, old * m + (1 - m) * mean)
    new = torch.where(counts > 0, new, old)
    torch._foreach_copy_(bufs, [v.view_as(t) for v, t in zip(new.split([t.numel() for t in bufs]), bufs)])
    torch._foreach_add_([ln.avg_count for ln in lns], 1.0)


def per_token_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(…, d) -> (…,): the standard deviation LayerNorm divides by, sqrt(var + eps)."""
    return (x.var(-1, unbiased=False) + eps).sqrt()


def _rms_standardize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms_token(x) in x's dtype, rstd (…, 1) in fp32), as Llama's RMSNorm computes it."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd


class SwitchableLayerNorm(nn.Module):
    """Drop-in for an `nn.LayerNorm` or an RMSNorm (same weight, and bias where it has one) that can be made fake.

    `center` is False for an RMSNorm: it neither subtracts the mean nor has a bias (`bias` is None). `weight` is the
    gain the norm multiplies by: the source norm's weight plus `gain_offset` (1 for Gemma's `(1 + weight)`).
    Buffers (scalars; shape (n_scales,) where a subclass keeps several sigmas, `SwitchableHeadNorm`): `fake` (0/1), `sigma`, `sigma_first`, `sigma_eot`, `special_first` and
    `special_eot` (0/1: whether the first position / EOT tokens still use their own sigma), and the moving
    averages `avg_std`, `avg_std_first`, `avg_std_eot` with `avg_count` (number of updates; 0 = not yet
    measured), current once `context.flush()` has run. The forward pass branches on Python copies of the
    0/1 buffers (kept in step by `go_fake`, `drop_specials` and `load_state_dict`), so it never waits for a
    device-to-host copy.
    """

    def __init__(self, ln: nn.Module, context: TokenContext | None = None, momentum: float = 0.9,
                 gain_offset: float = 0.0, n_scales: int | None = None):
        super().__init__()
        self.center = norm_kind(ln) != "rmsnorm"
        self.gain_offset = gain_offset  # the norm multiplies by (gain_offset + its weight); `weight` here is that sum
        self.weight = nn.Parameter(ln.weight.detach().clone() + gain_offset)
        bias = getattr(ln, "bias", None) if self.center else None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.eps = norm_eps(ln)
        self.momentum = momentum
        self.context = context or TokenContext()
        self.track = True  # update the moving averages on training forwards while real
        for name in ("fake", "sigma", "sigma_first", "sigma_eot", "special_first", "special_eot", "avg_std", "avg_std_first", "avg_std_eot", "avg_count"):
            scaled = n_scales is not None and name.startswith(("sigma", "avg_std"))
            shape = (n_scales,) if scaled else ()
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32))
        self._sync_flags()

    @property
    def norm_kind(self) -> str:
        """What `surgery.families.norm_kind` reads: this norm's kind is the one it was made from."""
        return "layernorm" if self.center else "rmsnorm"

    def _sync_flags(self) -> None:
        self.is_fake = bool(self.fake)
        self.has_specials = bool(self.special_first) or bool(self.special_eot)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    @torch.no_grad()
    def _measure(self, rstd: torch.Tensor) -> None:
        """Record this batch's per-token scale (1 / rstd: std for a LayerNorm, rms for an RMSNorm) summed over other tokens, the first
        position and EOT tokens; `context.flush()` folds it into the averages."""
        _, _, member, counts = self.context.groups(rstd.shape[:-1], rstd.device)
        sums = member @ rstd.reshape(-1).float().reciprocal()
        self.context.pending.append((self, sums, counts, self.momentum))

    def go_fake(self, sigma: float | None = None, special_first: bool = False, special_eot: bool = False) -> None:
        """Freeze `sigma` (default: the moving average; a float, or one per scale slot) and switch to the fake LN."""
        self.context.flush()
        if self.avg_count == 0 and sigma is None:
            raise RuntimeError("no std measured yet: a norm measures its input's scale only on forward passes in "
                               "training mode; call model.train() and run a few batches (or calibrate), or pass sigma")
        self.sigma.copy_(self.avg_std if sigma is None else torch.as_tensor(sigma, dtype=torch.float32).expand_as(self.sigma))
        self.sigma_first.copy_(torch.where(self.avg_std_first > 0, self.avg_std_first, self.sigma))
        self.sigma_eot.copy_(torch.where(self.avg_std_eot > 0, self.avg_std_eot, self.sigma))
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

    def _affine(self, z: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return z * gain if self.bias is None else torch.addcmul(self.bias, z, gain)

    def standardize(self, x: torch.Tensor, *also: "SwitchableLayerNorm") -> torch.Tensor:
        """x / scale_token(x) (centered first for a LayerNorm), no affine, for a real norm; measures the scale
        for this norm and for the real norms `also` reading the same input (one pass for all of them)."""
        measure = self.training and self.track
        if self.center:
            if not measure:
                return F.layer_norm(x, x.shape[-1:], None, None, self.eps)
            out, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, self.eps)
        else:
            out, rstd = _rms_standardize(x, self.eps)
        if measure:
            for ln in (self, *also):
                if ln.track:
                    ln._measure(rstd.detach())
        return out

    def rstd_of(self, z: torch.Tensor) -> torch.Tensor:
        """(…, 1): 1 / scale_token for `z = fixed_input(x)` of a real norm, differentiable (unlike the rstd that
        `native_layer_norm` returns); measured like `standardize` does. RMSNorm's in fp32, as Llama computes it."""
        rstd = torch.rsqrt(z.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.training and self.track:
            self._measure(rstd.detach())
        return rstd.to(z.dtype)

    def inverse_sigma(self, x: torch.Tensor) -> torch.Tensor:
        """1 / sigma of a fake norm for input `x` (…, d): a 0-d tensor, or (…, 1) while the first position or
        EOT tokens keep their own sigma."""
        if not self.has_specials:
            return self.sigma.reciprocal().to(x.dtype)
        first, eot, _, _ = self.context.groups(x.shape[:-1], x.device)
        sigma = torch.where(first & self.special_first.bool(), self.sigma_first, self.sigma)
        sigma = torch.where(eot & self.special_eot.bool(), self.sigma_eot, sigma)
        return sigma.reciprocal().unsqueeze(-1).to(x.dtype)

    def fixed_input(self, x: torch.Tensor) -> torch.Tensor:
        """What a fake norm scales: x centered (LayerNorm) or x itself (RMSNorm)."""
        return x - x.mean(-1, keepdim=True) if self.center else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_fake:
            if self.center and not (self.training and self.track):
                return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
            if self.center:
                out, _, rstd = torch.native_layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
                self._measure(rstd.detach())
                return out
            return self.weight * self.standardize(x)
        z = self.fixed_input(x)
        if self.has_specials:
            return self._affine(z * self.inverse_sigma(x), self.weight)
        return self._affine(z, self.weight / self.sigma.to(x.dtype))

    def extra_repr(self) -> str:
        kind = "LayerNorm" if self.center else "RMSNorm"
        state = f"fake, sigma={self.sigma.tolist()}" if self.is_fake else f"real, avg_std={self.avg_std.tolist()}"
        return f"{kind} {self.weight.shape[0]}, {state}"
