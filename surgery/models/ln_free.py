"""Decide from a model's own numbers whether its norms are neutralised (an LN-free model).

A LayerNorm divides each token by its scale `s_t = sqrt(var_t(x) + eps)` (an RMSNorm by
`sqrt(mean_t(x^2) + eps)`). LN-free models keep the norm modules but neutralise them with a huge epsilon:
when eps >> var_t for every token, `s_t = sqrt(eps) * (1 + var_t / (2 eps) + ...)` is a constant and the
norm is a fixed affine map (centering, then `w / sqrt(eps)` and `b`), which the layers reading it can absorb.
This is how every published format does it:
- our export (`surgery.remove_ln.export`): ln_1/ln_2 weight 1e6, bias 0; ln_f weight 1e6 w/sigma, bias b;
  eps 1e12; `config.surgery_ln_free` records it (but nothing here reads that key to decide);
- Baroni et al. 2025 (`schaeff/gpt2-*_LNFree*`): every LN's weight x 1e6/sigma, bias kept, eps 1e12;
- Heimersheim 2024 (`apollo-research/gpt2_noLN`): ln_1/ln_2 weight 1e6, bias 0; ln_f non-unit weight and
  bias; eps 1e12.

`scan_norms` runs a few token sequences (random ones by default, or held-out text) and measures, for every
norm, `scale_excess = max_t s_t / sqrt(eps) - 1`: how far the per-token scale rises above the constant
sqrt(eps) it would have with no input at all. A norm is **fixed** when scale_excess <= FIXED_SCALE_TOL
(its scale is then constant across tokens to that relative precision, and folding it with `1/sqrt(eps)` is
exact to the same precision); otherwise it still **normalizes**. A real LayerNorm (eps 1e-5) measures
scale_excess ~ 1e2-1e3; a neutralised one ~ var / (2e12) ~ 1e-12 for order-1 activations.
A fake `SwitchableLayerNorm` of a removal in progress divides by its frozen sigma: fixed; a real one is measured
(or, where no forward hook sees it, counted as normalizing with scale_excess inf).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import context_length_of, is_norm, norm_eps, norm_kind

FIXED_SCALE_TOL = 1e-6  # relative: a norm whose per-token scale stays within this of sqrt(eps) is fixed
SCAN_SEQUENCES, SCAN_LENGTH = 2, 32  # random token sequences measured when no tokens are given


@dataclass
class NormScan:
    """`scale_excess` per norm module name (max over measured tokens of s_t / sqrt(eps) - 1), in forward order."""

    scale_excess: dict[str, float] = field(default_factory=dict)
    eps: dict[str, float | None] = field(default_factory=dict)  # each norm's epsilon (None: a fake SwitchableLayerNorm)
    removal_in_progress: bool = False  # the model holds SwitchableLayerNorms (a surgery.remove_ln training model)

    @property
    def fixed(self) -> list[str]:
        return [n for n, e in self.scale_excess.items() if e <= FIXED_SCALE_TOL]

    @property
    def normalizing(self) -> list[str]:
        return [n for n, e in self.scale_excess.items() if e > FIXED_SCALE_TOL]

    @property
    def ln_free(self) -> bool:
        """Every norm is fixed (and there is at least one)."""
        return bool(self.scale_excess) and not self.normalizing

    @property
    def mixed(self) -> bool:
        return bool(self.fixed) and bool(self.normalizing)

    def kind(self) -> str:
        """'LN-free', 'with LN', 'partly LN-free' (some of each) or 'no norms'."""
        if not self.scale_excess:
            return "no norms"
        return "LN-free" if self.ln_free else "partly LN-free" if self.mixed else "with LN"

    def summary(self) -> dict:
        """A JSON-ready record: kind, counts, the largest scale_excess of the fixed norms, the normalizing ones."""
        fixed = [self.scale_excess[n] for n in self.fixed]
        return {
            "kind": self.kind(),
            "fixed_norms": len(fixed),
            "normalizing_norms": {n: self.scale_excess[n] for n in self.normalizing},
            "max_fixed_scale_excess": max(fixed, default=None),
            "tolerance": FIXED_SCALE_TOL,
        }


def _fake_excess(module: nn.Module) -> float:
    """A fake SwitchableLayerNorm divides by sigma (one per head for a per-head norm); with special first/EOT sigmas
    its scale varies by their ratio (the largest over heads)."""
    if not getattr(module, "has_specials", False):
        return 0.0
    specials = [module.sigma_first] * bool(module.special_first) + [module.sigma_eot] * bool(module.special_eot)
    return max(float((s / module.sigma - 1.0).abs().max()) for s in specials)


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm module (`surgery.families.is_norm`) with an epsilon, by module name, in definition order."""
    return {n: m for n, m in model.named_modules() if is_norm(m) and (norm_eps(m) is not None or hasattr(m, "is_fake"))}


def random_tokens(model: nn.Module, n: int = SCAN_SEQUENCES, length: int = SCAN_LENGTH, seed: int = 0) -> torch.Tensor:
    """(n, length) token ids drawn uniformly from the vocabulary, length capped at the context; global RNG untouched."""
    config = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(config, "vocab_size")
    n_ctx = context_length_of(config) or length
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, min(length, n_ctx)), generator=gen)


@torch.no_grad()
def scan_norms(model: nn.Module, tokens: torch.Tensor | None = None) -> NormScan:
    """Measure every norm's scale_excess (module docstring) on `tokens` (batch, pos), default `random_tokens`.

    Runs the base model (no LM head) one sequence at a time in eval mode; every module's train/eval mode is
    restored afterwards. Norms the forward pass never reaches are left out. A model that cannot run on token
    ids alone (an encoder-decoder, say) falls back to `_static_scan`.
    """
    norms = norm_modules(model)
    scan = NormScan(removal_in_progress=any(hasattr(m, "is_fake") for m in norms.values()))
    if not norms:
        return scan
    tokens = random_tokens(model) if tokens is None else tokens
    excess: dict[str, float] = {}

    def hook(name: str, module: nn.Module):
        def record(_, args, __):
            if getattr(module, "is_fake", False):
                excess[name] = _fake_excess(module)
                return
            x = args[0].detach().double()
            second = x.pow(2).mean(-1) if norm_kind(module) == "rmsnorm" else x.var(-1, unbiased=False)
            ratio = (second / norm_eps(module)).max().item()  # var / eps
            value = ratio / ((1.0 + ratio) ** 0.5 + 1.0)  # sqrt(1 + ratio) - 1 without cancellation
            excess[name] = max(excess.get(name, 0.0), value)

        return record

    modes = {m: m.training for m in model.modules()}
    runner = getattr(model, "base_model", model)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(runner.forward).parameters else {}
    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook(n, m)) for n, m in norms.items()]
    try:
        model.eval()
        for row in tokens.to(device):
            runner(input_ids=row[None], **extra)
    except Exception as err:  # any model-specific failure to run on bare token ids: judge from epsilons alone
        return _static_scan(model, norms, scan, err)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    for n, m in norms.items():  # the split Q/K/V copies of ln_1 are called through `standardize`, not forward
        if hasattr(m, "is_fake") and n not in excess:
            excess[n] = _fake_excess(m) if m.is_fake else float("inf")
    scan.scale_excess = {n: excess[n] for n in norms if n in excess}
    scan.eps = {n: _eps_or_none(norms[n]) for n in scan.scale_excess}
    return scan


def _eps_or_none(module: nn.Module) -> float | None:
    return None if getattr(module, "is_fake", False) else norm_eps(module)


def _static_scan(model: nn.Module, norms: dict[str, nn.Module], scan: NormScan, err: Exception) -> NormScan:
    """Without a forward pass: a norm with eps < 1 normalizes (being fixed would need its input's variance below
    FIXED_SCALE_TOL * eps < 1e-6, activations of std < 1e-3); one with a larger eps cannot be judged unmeasured."""
    unjudged = [n for n, m in norms.items() if not getattr(m, "is_fake", False) and norm_eps(m) >= 1.0]
    if unjudged:
        raise SurgeryError(
            f"could not run model {model_name(model)!r} on token ids to measure its norms ({type(err).__name__}: {err}); "
            f"norms with a large epsilon ({', '.join(unjudged[:4])}) cannot be judged without it"
        ) from err
    scan.scale_excess = {n: (_fake_excess(m) if getattr(m, "is_fake", False) else float("inf")) for n, m in norms.items()}
    scan.eps = {n: _eps_or_none(m) for n, m in norms.items()}
    return scan


def model_name(model: nn.Module) -> str:
    """How messages name a model: the path or Hub name it was loaded from, else its class."""
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def _listing(scan: NormScan, names: list[str], limit: int = 6) -> str:
    def one(n: str) -> str:
        eps = f"eps {scan.eps[n]:g}, " if scan.eps.get(n) is not None else ""
        return f"{n} ({eps}scale varies by {scan.scale_excess[n]:.3g})"

    shown = ", ".join(one(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_consistent(model: nn.Module, scan: NormScan, allow_removal_in_progress: bool = True) -> None:
    """Raise SurgeryError for a model whose norms disagree: some fixed while others still normalize (unless it is a
    removal in progress and that is allowed), or `config.surgery_ln_free` set while norms still normalize."""
    if scan.mixed and not (allow_removal_in_progress and scan.removal_in_progress):
        raise SurgeryError(
            f"model {model_name(model)!r} is only partly LN-free: {len(scan.fixed)} norm(s) are neutralised (per-token "
            f"scale fixed by a huge epsilon) but {len(scan.normalizing)} still normalize per token: "
            f"{_listing(scan, scan.normalizing)}. Convert every norm the same way (weight x 1e6/sigma and eps 1e12 "
            "on each), or export the removal only once every LayerNorm is fake"
        )
    claimed = getattr(getattr(model, "config", None), "surgery_ln_free", None) is not None
    if claimed and scan.normalizing and not scan.removal_in_progress:
        raise SurgeryError(
            f"config.surgery_ln_free says model {model_name(model)!r} is LN-free, but its norms still normalize per token "
            f"(an LN-free export uses eps 1e12): {_listing(scan, scan.normalizing)}"
        )


def detect_ln_free(model: nn.Module, tokens: torch.Tensor | None = None) -> bool:
    """True when every norm of `model` is neutralised, False when they all still normalize (or there are none);
    SurgeryError, naming the norms that still normalize, when the model is partly converted (`check_consistent`)."""
    scan = scan_norms(model, tokens)
    check_consistent(model, scan, allow_removal_in_progress=False)
    return scan.ln_free
