"""Per-head activation patching and attribution patching on an induction task built from held-out text.

Task: a clean prompt is a text segment S (tokens of held-out code) followed by S again; the model can
predict the second copy by induction. The corrupted prompt replaces the first copy by another segment, so
induction cannot help. Metric: mean log-probability of the correct next token over the second copy
(positions k .. 2k-2 predicting tokens k+1 .. 2k-1, k = segment length).

Per head (layer l, head h), with z = `blocks.{l}.attn.hook_z[:, :, h]` (batch, pos, d_head):
- activation patching (noising): metric(clean run with z taken from the corrupted run) - metric(clean);
- attribution patching: its first-order estimate sum((z_corrupted - z_clean) * d metric / d z at the clean run),
  one backward pass for all heads (Nanda 2023, "Attribution Patching").
"""

from __future__ import annotations

import math

import torch


def induction_prompts(tokens: torch.Tensor, seg_len: int, n_prompts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, corrupted), each (n_prompts, 2 * seg_len), from windows of a flat token array `tokens`."""
    if tokens.numel() < 2 * seg_len + 1:
        raise ValueError(f"need at least {2 * seg_len + 1} tokens for {seg_len}-token segments, got {tokens.numel()}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seg_len, (2, n_prompts), generator=gen)
    seg = torch.stack([tokens[s : s + seg_len] for s in starts[0]])
    other = torch.stack([tokens[s : s + seg_len] for s in starts[1]])
    return torch.cat([seg, seg], dim=1), torch.cat([other, seg], dim=1)


def induction_metric(logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Mean log-prob of the correct next token over the second copy; logits (batch, pos, vocab)."""
    k = clean.shape[1] // 2
    logp = logits[:, k:-1].float().log_softmax(-1)
    return logp.gather(-1, clean[:, k + 1 :, None]).mean()


def _z_names(hooked) -> list[str]:
    return [f"blocks.{layer}.attn.hook_z" for layer in range(hooked.cfg.n_layers)]


def patching_effects(hooked, clean: torch.Tensor, corrupted: torch.Tensor) -> dict:
    """Per-head effects of noising each head's z, exact and first-order; lists are layer-major (l * n_heads + h)."""
    names = _z_names(hooked)
    with torch.no_grad():
        corr_logits, corr_cache = hooked.run_with_cache(corrupted, names_filter=lambda n: n in names)
        z_corr = {n: corr_cache[n].clone() for n in names}
        clean_metric = induction_metric(hooked(clean), clean).item()
        corr_metric = induction_metric(corr_logits, clean).item()

    saved: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(z, hook):
            z.retain_grad()
            saved[name] = z
            return z

        return hook

    with torch.enable_grad():
        metric = induction_metric(hooked.run_with_hooks(clean, fwd_hooks=[(n, keep(n)) for n in names]), clean)
        metric.backward()
    attribution, activation = [], []
    for name in names:
        z_clean, grad = saved[name].detach(), saved[name].grad
        attribution += ((z_corr[name] - z_clean) * grad).sum(dim=(0, 1, 3)).tolist()
        for h in range(hooked.cfg.n_heads):
            activation.append(_patched_metric(hooked, clean, name, h, z_corr[name]) - clean_metric)
    hooked.zero_grad(set_to_none=True)
    return {
        "clean_metric": clean_metric,
        "corrupted_metric": corr_metric,
        "activation_patching": activation,
        "attribution_patching": attribution,
        "correlation": pearson(attribution, activation),
    }


@torch.no_grad()
def _patched_metric(hooked, clean: torch.Tensor, name: str, head: int, z_source: torch.Tensor) -> float:
    def patch(z, hook):
        z = z.clone()
        z[:, :, head] = z_source[:, :, head]
        return z

    return induction_metric(hooked.run_with_hooks(clean, fwd_hooks=[(name, patch)]), clean).item()


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; nan when either side is constant."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return (a @ b / denom).item() if denom > 0 else math.nan
