"""Entry masks: which entries of which parameters training may change.

A mask is a bool tensor shaped like its parameter (True = trainable entry). `EntryMask.apply`
multiplies gradients by the mask and `EntryMask.restore` (called after every optimizer step) puts
the untouched entries back bit for bit, so neither weight decay nor optimizer momentum can move them.
Masks are saved as safetensors (one bool tensor per parameter name) and can be reused on another task.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from surgery.errors import SurgeryError

FORMAT = "surgery-ln-mask"


def _k_of(total: int, fraction: float | None, count: int | None) -> int:
    if (fraction is None) == (count is None):
        raise SurgeryError("give exactly one of fraction (share of entries, 0 < f <= 1) and count (number of entries)")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise SurgeryError(f"mask fraction must be in (0, 1], got {fraction}")
        return max(1, round(fraction * total))
    if not 0 < count <= total:
        raise SurgeryError(f"mask count must be in 1..{total} (the number of scored entries), got {count}")
    return count


class EntryMask:
    """`masks`: parameter name -> bool tensor of the parameter's shape."""

    def __init__(self, masks: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.masks = {n: m.to(torch.bool).cpu() for n, m in masks.items()}
        self.metadata = dict(metadata or {})
        self._originals: dict[str, torch.Tensor] = {}
        self._handles: list = []

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def top_k(cls, scores: dict[str, torch.Tensor], fraction: float | None = None, count: int | None = None) -> EntryMask:
        """The k highest-scoring entries over all parameters together (ties: earlier name/index first)."""
        names = list(scores)
        flat = torch.cat([scores[n].detach().reshape(-1).double().cpu() for n in names])
        k = _k_of(flat.numel(), fraction, count)
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.argsort(flat, descending=True, stable=True)[:k]] = True
        return cls(cls._split(chosen, names, scores), {"selection": "fisher-top-k"})

    @classmethod
    def random(cls, shapes: dict[str, torch.Size], fraction: float | None = None, count: int | None = None,
               seed: int = 0) -> EntryMask:
        """k entries drawn uniformly without replacement over all parameters together."""
        names = list(shapes)
        total = sum(int(torch.Size(s).numel()) for s in shapes.values())
        k = _k_of(total, fraction, count)
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k]] = True
        like = {n: torch.empty(shapes[n]) for n in names}
        return cls(cls._split(chosen, names, like), {"selection": "random", "seed": str(seed)})

    @staticmethod
    def _split(flat: torch.Tensor, names: list[str], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for n in names:
            size = like[n].numel()
            out[n] = flat[start : start + size].reshape(like[n].shape)
            start += size
        return out

    # --- counting and I/O -------------------------------------------------------------------
    def selected(self) -> int:
        return int(sum(m.sum() for m in self.masks.values()))

    def total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def save(self, path: str | Path) -> None:
        meta = {"format": FORMAT, "selected": str(self.selected()), "total": str(self.total()), **self.metadata}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({n: m.contiguous() for n, m in self.masks.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> EntryMask:
        if not Path(path).exists():
            raise SurgeryError(f"mask file {str(path)!r} does not exist")
        from surgery.models.loading import check_safetensors

        try:
            check_safetensors(Path(path))
        except SurgeryError as err:
            raise SurgeryError(f"mask file {str(path)!r} is not a safetensors file ({str(err).split(': ', 1)[-1].split(';')[0]}); "
                               "pass the masks.safetensors an LN-tuning run wrote (<run>/masks.safetensors)") from None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise SurgeryError(f"{str(path)!r} is not an LN-tuning mask (safetensors metadata format != {FORMAT!r})")
            masks = {n: f.get_tensor(n) for n in f.keys()}
        return cls(masks, {k: v for k, v in meta.items() if k not in ("format", "selected", "total")})

    # --- training ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.masks if n not in params]
        if missing:
            modules = dict(model.named_modules())
            no_bias = [n for n in missing if n.endswith(".bias") and n[: -len(".bias")] in modules]
            why = (f"; {len(no_bias)} of them are biases of modules without one (e.g. an RMSNorm has a gain only: "
                   "was the mask made on a LayerNorm model?)" if no_bias else "")
            raise SurgeryError(f"the mask names parameters this model does not have: {missing[:3]} "
                               f"({len(missing)} in all){why}; masks transfer only between models of the same "
                               "architecture")
        for n, m in self.masks.items():
            if m.shape != params[n].shape:
                raise SurgeryError(f"mask for {n!r} has shape {tuple(m.shape)}, the parameter {tuple(params[n].shape)}")
        return {n: params[n] for n in self.masks}

    def apply(self, model: nn.Module) -> EntryMask:
        """Masked parameters train only their True entries; a parameter with no True entry is frozen.

        Parameters the mask does not name keep their `requires_grad` (e.g. a task head stays trainable).
        Call `restore(model)` after each optimizer step.
        """
        self.remove_hooks()
        self._originals = {}
        for n, p in self.check(model).items():
            m = self.masks[n].to(p.device)
            p.requires_grad_(bool(m.any()))
            if m.any() and not m.all():
                self._originals[n] = p.detach().clone()
                self._handles.append(p.register_hook(lambda g, m=m: g * m.to(g.dtype)))
        return self

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put every entry outside the mask back to its value at `apply` time (bit-identical)."""
        params = dict(model.named_parameters())
        for n, original in self._originals.items():
            p = params[n]
            p.copy_(torch.where(self.masks[n].to(p.device), p, original.to(p.device)))

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
