"""The sigma table of Heimersheim 2024: mean per-token std at every LN, measured before training."""

from __future__ import annotations

import itertools

import torch

from surgery.remove_ln.fake_ln import SwitchableLayerNorm
from surgery.remove_ln.points import token_context


@torch.no_grad()
def calibrate(model, points: dict[str, SwitchableLayerNorm], batches, n_batches: int, eos_id: int | None) -> dict[str, float]:
    """Run `n_batches` batches with every LN real; return {point: mean std (a list per head for a per-head norm)}
    and freeze the averages.

    The per-point averages (including the first-position and end-of-text ones) become plain means
    over the batches, and stop updating during training.
    """
    was_training = model.training
    model.train()  # the LNs measure only in training mode; nothing else here depends on it
    context = token_context(points)
    for i, batch in enumerate(itertools.islice(batches, n_batches)):
        for ln in points.values():
            ln.track, ln.momentum = True, i / (i + 1)  # running mean
        batch = batch.to(next(model.parameters()).device)
        context.eot_mask = batch == eos_id if eos_id is not None else None
        model(batch)
        context.flush()
    model.train(was_training)
    for ln in points.values():
        ln.track = False
    return {name: ln.avg_std.tolist() for name, ln in points.items()}  # a float, or one per head
