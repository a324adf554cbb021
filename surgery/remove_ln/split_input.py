"""The attention norm split in two: one copy for the query/key path, one for the value path.

The papers remove the attention norm's Q/K and V paths at different steps, so a prepared block holds two
`SwitchableLayerNorm` copies of it. `AttnInputNorms` takes the attention norm's place (its forward passes the
residual stream through unchanged) and owns both copies; the attention input projection(s) are wrapped to read
the raw stream through them:

- a fused projection (GPT-2's [q|k|v] Conv1D, GPT-NeoX's per-head [q,k,v] Linear) becomes a `SplitQKVInput`,
  which knows from a mask which of its outputs are value features;
- separate q/k/v projections (Llama-style) each become a `NormedInput` reading one copy; the three share
  one computation of both copies per forward.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from surgery.families import in_out_weight
from surgery.remove_ln.fake_ln import SwitchableLayerNorm


class AttnInputNorms(nn.Module):
    """Stands where the attention norm was: identity on the residual stream, owner of the two copies."""

    def __init__(self, ln_qk: SwitchableLayerNorm, ln_v: SwitchableLayerNorm):
        super().__init__()
        self.ln_qk, self.ln_v = ln_qk, ln_v
        self._memo: list | None = None  # [weak ref to x, (x_qk, x_v), uses left]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __getstate__(self):  # copies and pickles start with no memo (it holds a weak reference)
        state = self.__dict__.copy()
        state["_memo"] = None
        return state

    def inputs(self, x: torch.Tensor, uses: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """(ln_qk(x), ln_v(x)), computed (and measured) once for the `uses` projections reading them; z is
        standardized once for both copies whenever they share it (`shared_input`)."""
        hit = self._memo
        if hit is not None and hit[0]() is x:
            hit[2] -= 1
            if hit[2] <= 0:
                self._memo = None
            return hit[1]
        shared = self.shared_input(x)
        if shared is not None:
            z, g_qk, g_v = shared
            out = (self.ln_qk._affine(z, g_qk), self.ln_v._affine(z, g_v))
        else:
            out = (self.ln_qk(x), self.ln_v(x))
        if uses > 1:
            self._memo = [weakref.ref(x), out, uses - 1]
        return out

    def shared_input(self, x: torch.Tensor):
        """(z, gain_qk, gain_v) when both copies are `z * gain + bias` of one z: both real (z standardized once),
        or both fake without special tokens (z their fixed input); None while they differ."""
        qk, v = self.ln_qk, self.ln_v
        if not qk.is_fake and not v.is_fake:
            return qk.standardize(x, v), qk.weight, v.weight
        if qk.is_fake and v.is_fake and not qk.has_specials and not v.has_specials:
            return qk.fixed_input(x), qk.weight / qk.sigma, v.weight / v.sigma
        return None


    def scaled_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(z, s_qk, s_v) with ln_qk(x) = z * s_qk * weight_qk + bias_qk and likewise for ln_v, in any state:
        z is standardized once while both copies are real (s None), else their shared fixed input, with each
        copy's own 1 / scale: a 0-d 1/sigma, or (…, 1) per token (a real copy's measured rstd, or a fake copy's
        sigma while special tokens keep their own)."""
        qk, v = self.ln_qk, self.ln_v
        if not qk.is_fake and not v.is_fake:
            return qk.standardize(x, v), None, None
        z = qk.fixed_input(x)  # both copies center (LayerNorm) or neither (RMSNorm): one fixed input
        return z, *(ln.inverse_sigma(x) if ln.is_fake else ln.rstd_of(z) for ln in (qk, v))


class _ReadsNorms(nn.Module):
    """Holds the block's `AttnInputNorms` without registering it (the block owns it at the norm's place)."""

    def __init__(self, proj: nn.Module, norms: AttnInputNorms):
        super().__init__()
        self.proj = proj
        object.__setattr__(self, "_norms", norms)

    @property
    def norms(self) -> AttnInputNorms:
        return self._norms


class SplitQKVInput(_ReadsNorms):
    """A fused Q/K/V projection reading the raw residual stream: value outputs (`value_mask`) through `ln_v`,
    query/key outputs through `ln_qk`.

    On batches of more tokens than the projection has outputs, one matmul in every state: both copies are
    `z * scale * gain + bias` of one shared z (`AttnInputNorms.scaled_input`), so the gains and biases fold into
    the weight and bias, and a per-token scale (a real copy's beside a fake one's, or special tokens' sigmas)
    multiplies its column group of the output. On smaller batches (folding would cost more than it saves)
    two matmuls over the two column groups.
    """

    def __init__(self, proj: nn.Module, norms: AttnInputNorms, value_mask: torch.Tensor):
        super().__init__(proj, norms)
        self.register_buffer("value_mask", value_mask.clone(), persistent=False)
        idx = torch.arange(len(value_mask))
        self.register_buffer("qk_idx", idx[~value_mask], persistent=False)
        self.register_buffer("v_idx", idx[value_mask], persistent=False)
        self.register_buffer("inverse", torch.argsort(torch.cat([idx[~value_mask], idx[value_mask]])), persistent=False)
        n_qk = int((~value_mask).sum())
        self.v_last = bool(value_mask[n_qk:].all())  # GPT-2: [q|k|v], values a contiguous tail
        self.fold_min_tokens = len(value_mask)  # fold only when a batch has more tokens than the projection outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = in_out_weight(self.proj), self.proj.bias
        d, n_out = w.shape
        ln_qk, ln_v = self.norms.ln_qk, self.norms.ln_v
        if x.reshape(-1, d).shape[0] >= self.fold_min_tokens:
            return self._folded(x, w, b)
        shared = self.norms.shared_input(x)
        if shared is not None:
            z, g_qk, g_v = shared
            x_qk, x_v = ln_qk._affine(z, g_qk), ln_v._affine(z, g_v)
        else:
            x_qk, x_v = ln_qk(x), ln_v(x)
        if self.v_last:  # split(), not slicing: a slice's backward fills a zero gradient of the whole weight
            n_qk = len(self.qk_idx)
            w_qk, w_v = w.split([n_qk, n_out - n_qk], 1)
            b_qk, b_v = (None, None) if b is None else b.split([n_qk, n_out - n_qk])
        else:
            w_qk, w_v = w.index_select(1, self.qk_idx), w.index_select(1, self.v_idx)
            b_qk, b_v = (None, None) if b is None else (b.index_select(0, self.qk_idx), b.index_select(0, self.v_idx))
        qk, v = _linear(x_qk.reshape(-1, d), w_qk, b_qk), _linear(x_v.reshape(-1, d), w_v, b_v)
        out = torch.cat([qk, v], dim=-1)
        if not self.v_last:
            out = out.index_select(1, self.inverse)
        return out.view(*x.shape[:-1], n_out)


    def _folded(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """One matmul: (z @ W_gain) * per-token scale + folded bias. O(d * n_out) extra work for the fold. Once both
        copies are fake without special tokens, z is x itself: a LayerNorm's centering folds into the weight too."""
        d, n_out = w.shape
        ln_qk, ln_v, mask = self.norms.ln_qk, self.norms.ln_v, self.value_mask
        settled = ln_qk.is_fake and ln_v.is_fake and not ln_qk.has_specials and not ln_v.has_specials
        if settled:  # both fixed: the centering is linear too, and folds into the weight below
            z, s_qk, s_v = x, ln_qk.inverse_sigma(x), ln_v.inverse_sigma(x)
        else:
            z, s_qk, s_v = self.norms.scaled_input(x)
        g_qk, g_v = ln_qk.weight, ln_v.weight
        if s_qk is not None and s_qk.dim() == 0:  # a scalar scale folds into the gain
            g_qk, s_qk = g_qk * s_qk, None
        if s_v is not None and s_v.dim() == 0:
            g_v, s_v = g_v * s_v, None
        w_eff = torch.where(mask, w * g_v[:, None], w * g_qk[:, None])
        if settled and ln_qk.center:  # (x - mean(x)) @ W = x @ (W - mean of W's rows)
            w_eff = w_eff - w_eff.mean(0, keepdim=True)
        if ln_qk.bias is not None:
            shift = torch.where(mask, ln_v.bias @ w, ln_qk.bias @ w)
            b = shift if b is None else b + shift
        z = z.reshape(-1, d)
        if s_qk is None and s_v is None:
            out = z @ w_eff if b is None else torch.addmm(b, z, w_eff)
            return out.view(*x.shape[:-1], n_out)
        scale = torch.where(mask, 1.0 if s_v is None else s_v.reshape(-1, 1), 1.0 if s_qk is None else s_qk.reshape(-1, 1))
        out = (z @ w_eff) * scale
        return (out if b is None else out + b).view(*x.shape[:-1], n_out)


class NormedInput(_ReadsNorms):
    """One of separate q/k/v projections reading the raw residual stream through its norm copy
    (`which` = "qk" for the query and key projections, "v" for the value projection)."""

    def __init__(self, proj: nn.Module, norms: AttnInputNorms, which: str):
        super().__init__(proj, norms)
        self.which = which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_qk, x_v = self.norms.inputs(x)
        return self.proj(x_qk if self.which == "qk" else x_v)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)
