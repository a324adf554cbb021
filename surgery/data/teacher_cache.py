"""A teacher's top-k next-token log-probabilities for every block of a token array, computed once and stored beside
the token cache, so that every run, seed and arm that distils from the same teacher on the same data skips the
teacher's forward.

    cache = TeacherCache(tokens, block_size=256, k=32, teacher=model_key(teacher))
    ids, log_probs, rest = cache.targets(batch, teacher_log_probs)   # batch (B, T) ids; fills missing blocks

Layout, under `<cache dir>/teacher/<teacher>-<tokens>-b<block size>-k<k>/` (numpy memory maps, written in place):
`ids.npy` (blocks, block_size, k) uint16 (int32 for a vocabulary above 65,536), `log_probs.npy` (blocks,
block_size, k) float32 (nats, temperature 1, most likely first), `rest.npy` (blocks, block_size) float32 (the
probability of all other entries together) and `filled.npy` (blocks,) uint8. A block is found by its content (a
hash of its tokens), so the cache needs no change to how batches are drawn; one not yet filled is computed by the
teacher on first use and stored (`build` fills a list of blocks ahead of time). Identity: `model_key` hashes the
teacher's weights and config, the token array is hashed whole; a different teacher, corpus, tokenizer, block size
or k is a different directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.models.paths import cache_dir

LogProbs = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) -> log-probabilities (B, T, V), temperature 1


def model_key(model: torch.nn.Module) -> str:
    """A 16-hex-digit hash of a model's config and every parameter and buffer (names, dtypes, values)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode() if hasattr(model, "config") else b"")
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def top_k(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (..., k), their log-probabilities (..., k), the remaining mass (...) clamped to [0, 1]) of log_probs (..., V)."""
    values, ids = log_probs.float().topk(k, dim=-1)
    rest = (1 - values.exp().sum(-1)).clamp(0.0, 1.0)
    return ids, values, rest


class TeacherCache:
    """Top-k targets of one teacher for the `block_size` blocks of `tokens` (1-D int array), k per position."""

    def __init__(self, tokens: np.ndarray, block_size: int, k: int, teacher: str, vocab_size: int | None = None,
                 root: Path | None = None):
        if vocab_size is not None and not 0 < k < vocab_size:
            raise SurgeryError(f"distill.teacher_top_k={k}: must be between 1 and the vocabulary size - 1 ({vocab_size - 1})")
        self.block_size, self.k = block_size, k
        n = len(tokens) // block_size
        blocks = np.ascontiguousarray(tokens[: n * block_size], dtype=np.int32).reshape(n, block_size)
        self.rows = {self._digest(b): i for i, b in enumerate(blocks)}
        tokens_key = hashlib.sha256(blocks.tobytes()).hexdigest()[:16]
        self.path = (root or cache_dir() / "teacher") / f"{teacher}-{tokens_key}-b{block_size}-k{k}"
        self.path.mkdir(parents=True, exist_ok=True)
        id_type = np.uint16 if (vocab_size or int(blocks.max(initial=0)) + 1) <= 65536 else np.int32
        self.ids = self._open("ids", (n, block_size, k), id_type)
        self.log_probs = self._open("log_probs", (n, block_size, k), np.float32)
        self.rest = self._open("rest", (n, block_size), np.float32)
        self.filled = self._open("filled", (n,), np.uint8)

    @staticmethod
    def _digest(block: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(block, dtype=np.int32).tobytes(), digest_size=16).digest()

    def _open(self, name: str, shape: tuple, dtype) -> np.memmap:
        path = self.path / f"{name}.npy"
        if not path.exists():  # created whole under a temporary name: ranks of a DDP run may open it at once
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
            tmp.replace(path)
        array = np.load(path, mmap_mode="r+")
        if array.shape != shape or array.dtype != dtype:
            raise SurgeryError(f"teacher cache {path} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}: "
                               f"delete {self.path} and run again")
        return array

    def __len__(self) -> int:
        return len(self.filled)

    def rows_of(self, ids: torch.Tensor) -> np.ndarray:
        """The block index of each row of ids (B, block_size); refuses a block that is not in the token array."""
        if ids.shape[-1] != self.block_size:
            raise SurgeryError(f"teacher cache of {self.block_size}-token blocks given {ids.shape[-1]}-token rows: "
                               "set data.block_size to the cache's, or let the run build a cache of its own")
        found = [self.rows.get(self._digest(row)) for row in ids.detach().cpu().numpy()]
        if any(r is None for r in found):
            raise SurgeryError("a training batch holds a block the teacher cache was not built on: the cache covers the "
                               "training split's blocks only; train on that split, or set distill.teacher_top_k null")
        return np.asarray(found, dtype=np.int64)

    def build(self, rows: list[int] | np.ndarray, tokens_of: Callable[[np.ndarray], torch.Tensor], teacher: LogProbs,
              batch_size: int = 8) -> int:
        """Fill the blocks `rows` that are not filled yet; tokens_of(rows) gives their ids (B, block_size). Returns
        how many were computed."""
        todo = [int(r) for r in rows if not self.filled[r]]
        for start in range(0, len(todo), batch_size):
            chunk = np.asarray(todo[start : start + batch_size])
            with torch.no_grad():
                self._store(chunk, teacher(tokens_of(chunk)))
        return len(todo)

    def _store(self, rows: np.ndarray, log_probs: torch.Tensor) -> None:
        ids, values, rest = (t.detach().cpu().numpy() for t in top_k(log_probs, self.k))
        self.ids[rows], self.log_probs[rows], self.rest[rows] = ids, values, rest
        self.filled[rows] = 1  # after the values: a reader never sees a filled block without them

    def targets(self, ids: torch.Tensor, teacher: LogProbs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top-k ids (B, T, k) long, log-probs (B, T, k), rest (B, T)) on ids' device for ids (B, T); blocks not yet
        filled are computed by `teacher` (ids -> log-probs (B, T, V)) and stored."""
        rows = self.rows_of(ids)
        missing = ~self.filled[rows].astype(bool)
        if missing.any():
            with torch.no_grad():
                self._store(rows[missing], teacher(ids[torch.from_numpy(missing).to(ids.device)]))
        device = ids.device
        return (torch.from_numpy(self.ids[rows].astype(np.int64)).to(device),
                torch.from_numpy(np.asarray(self.log_probs[rows])).to(device),
                torch.from_numpy(np.asarray(self.rest[rows])).to(device))
