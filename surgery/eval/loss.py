"""Held-out cross-entropy (nats/token) and perplexity of a causal LM."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from surgery.errors import SurgeryError


@torch.no_grad()
def cross_entropy(model: torch.nn.Module, blocks: Dataset, batch_size: int = 16, progress: bool | None = None) -> dict:
    """Mean next-token cross-entropy over every predicted token of `blocks` (each a (T,) LongTensor).

    progress: a progress bar (True), none (False), or (None) one on a terminal when there are more than 20 batches
    (a run's final evaluation on a whole validation split takes minutes on a CPU).

    Returns {"loss": nats/token, "perplexity": exp(loss), "tokens": number of predicted tokens}.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = DataLoader(blocks, batch_size=batch_size)
    show = progress if progress is not None else (None if len(batches) > 20 else False)  # tqdm: None = only on a TTY
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not show if show is not None else None):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    if count == 0:
        raise SurgeryError("no token to predict: every evaluated block must hold at least 2 tokens, and there must be at "
                           "least one block; raise the block size or the number of blocks")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
