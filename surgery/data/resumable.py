"""A training order that survives a restart: a shuffle seeded per epoch, and a DataLoader that Lightning
checkpoints mid-epoch (its `state_dict` is stored in the checkpoint's loop state and loaded on resume).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A random order of `range(n)` that depends only on `(seed, epoch)`; Lightning calls `set_epoch`.

    Epoch 0 is `torch.randperm(n)` from a generator seeded with `seed` (the order of a `RandomSampler`
    with that generator), so runs started before this sampler existed see the same first epoch.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A `DataLoader` whose state is how many batches it served in the current epoch.

    On resume Lightning calls `load_state_dict` before the first batch; the next pass over the same
    epoch then skips the batches the interrupted run had already trained on. Lightning takes the
    loader's state at checkpoint time (sized loaders are not prefetched), so the count is exact.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # Without a generator of its own, every new iterator draws a worker seed from the global RNG,
        # and a resumed run (which creates its iterator after restoring that RNG) would drift from an
        # uninterrupted one.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        self._served, self._epoch = 0, None
        self._resume: dict[str, int] | None = None

    def _sampler_epoch(self) -> int | None:
        sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
        return getattr(sampler, "epoch", None)

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        self._epoch, self._served = self._sampler_epoch(), 0
        resume, self._resume = self._resume, None
        if resume and resume["epoch"] == self._epoch and resume["batches"] < len(self):
            for _ in range(resume["batches"]):
                next(it)
                self._served += 1
        for batch in it:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": -1 if self._epoch is None else int(self._epoch), "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": state["epoch"] if state["epoch"] >= 0 else None, "batches": int(state["batches"])}
