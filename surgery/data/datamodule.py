"""Packed, fixed-length token blocks with an end-of-text token between documents."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from surgery.data.corpus import SPLITS, Corpus, fingerprint, load_documents, short_split_cause
from surgery.data.resumable import EpochShuffle, ResumableLoader
from surgery.data.tokenizer import eos_id, get_tokenizer
from surgery.errors import SurgeryError
from surgery.models.paths import cache_dir


def tokenize_split(corpus: Corpus, tokenizer, split: str) -> np.ndarray:
    """All documents of a split as one int32 array, each document followed by end-of-text.

    Cached on disk, keyed by the corpus fingerprint and a hash of the tokenizer.
    """
    tok_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]
    path = cache_dir() / "tokens" / f"{fingerprint(corpus)}-{tok_hash}-{split}.npy"
    if path.exists():
        return np.load(path)
    eos = eos_id(tokenizer)
    chunks: list[np.ndarray] = []
    for doc in tqdm(load_documents(corpus, split), desc=f"tokenizing {corpus.source} ({split})", unit="doc", mininterval=2.0):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        chunks.append(np.asarray(ids + [eos], dtype=np.int32))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # ranks of a DDP run may tokenize at once
    np.save(tmp, tokens)
    tmp.replace(path)
    return tokens


class TooFewTokens(SurgeryError):
    """A split with fewer tokens than one block. The message names the fix in training's settings (data.*);
    `surgery eval` and `surgery verify` name their own flags after `what` (the split, its size and the cause)."""

    def __init__(self, corpus: Corpus, split: str, tokens: int, block_size: int):
        self.split, self.tokens, self.block_size = split, tokens, block_size
        self.cause = short_split_cause(corpus, split, tokens)
        name = f"the {split} split of {corpus.source!r}" if split != "all" else f"{corpus.source!r}"
        self.what = f"{name} has {tokens} tokens, fewer than one block of {block_size}"
        cause = f" ({self.cause})" if self.cause else ""
        super().__init__(f"{self.what}: add text, lower data.block_size or raise data.val_fraction{cause}")


class Blocks(Dataset):
    """Non-overlapping `block_size` windows of a token array; item i is a LongTensor (block_size,)."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_blocks: int | None = None):
        self.tokens, self.block_size = tokens, block_size
        self.n = len(tokens) // block_size
        if max_blocks is not None:
            self.n = min(self.n, max_blocks)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        s = i * self.block_size
        return torch.from_numpy(self.tokens[s : s + self.block_size].astype(np.int64))


class TokenBlocks(L.LightningDataModule):
    """Token blocks from a corpus for causal-LM training.

    Args:
        data: "stdlib" (the running Python's standard library, the offline default), a local
            .txt/.jsonl/.parquet/.csv file or a directory of them, or a Hub dataset name (streamed).
        tokenizer: a Hub name or local path, or "bpe-N" to train an N-entry byte-level BPE on the corpus.
        block_size: tokens per training example.
        batch_size: examples per batch.
        val_fraction: share held out for validation: of files (split by a hash of the path), of rows for a
            single .jsonl/.parquet/.csv file, of text (the end, from a line start) for a single text file.
        max_val_blocks: cap on validation blocks (the first ones, in a fixed order); None for all. It caps
            `split("all")` too, the whole source that `surgery eval` scores.
        text_field: field (column) holding text in .jsonl/.parquet/.csv rows and Hub datasets.
        max_documents: rows read from a streamed Hub dataset, both splits together (None: all).
        seed: seed of the training order; None (default): the run's `seed_everything`. Saved in the
            checkpoint, so a resumed run keeps its order whatever seed the restart draws.
        encoding_errors: what a local file that is not UTF-8 does: "refuse" (an error counting all such
            files), "skip" it or "replace" its undecodable bytes by U+FFFD (both counted in a warning).
            None (default): "skip" for "stdlib" (a few of its test files are deliberately not UTF-8), else "refuse".
    """

    def __init__(
        self,
        data: str = "stdlib",
        tokenizer: str = "bpe-4096",
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.02,
        max_val_blocks: int | None = None,
        text_field: str = "text",
        max_documents: int | None = None,
        seed: int | None = None,
        encoding_errors: Literal["refuse", "skip", "replace"] | None = None,
    ):
        super().__init__()
        if 0 < block_size < 2:
            raise SurgeryError(f"data.block_size={block_size}: a block needs at least 2 tokens (each token is predicted "
                               "from the ones before it); set data.init_args.block_size to 2 or more, e.g. 256")
        if block_size <= 0 or batch_size <= 0:
            raise SurgeryError(f"data.block_size and data.batch_size must be positive (got {block_size}, {batch_size})")
        self.corpus = Corpus(data, val_fraction, text_field, max_documents, encoding_errors)
        self.corpus.files()  # fail early on a missing path
        self.tokenizer_spec = tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.max_val_blocks, self.seed = max_val_blocks, seed
        self._order_seed: int | None = None
        self._tokenizer = None
        self._splits: dict[str, Blocks] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.tokenizer_spec, self.corpus)
        return self._tokenizer

    def split(self, name: str) -> Blocks:
        """The blocks of "train", "validation" or "all" (the whole source); TooFewTokens when not one block fits."""
        if name not in SPLITS:
            raise ValueError(name)
        if name not in self._splits:
            tokens = tokenize_split(self.corpus, self.tokenizer, name)
            blocks = Blocks(tokens, self.block_size, None if name == "train" else self.max_val_blocks)
            if len(blocks) == 0:
                raise TooFewTokens(self.corpus, name, len(tokens), self.block_size)
            self._splits[name] = blocks
        return self._splits[name]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.split("train")
        self.split("validation")

    def order_seed(self) -> int:
        """The training order's seed: `seed`, else the one `seed_everything` set (PL_GLOBAL_SEED, the same on
        every rank), fixed at first use and restored from a checkpoint."""
        if self._order_seed is None:
            self._order_seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._order_seed

    def state_dict(self) -> dict[str, int]:
        return {"order_seed": self.order_seed()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._order_seed = int(state["order_seed"])

    def train_dataloader(self) -> DataLoader:
        train = self.split("train")  # shuffled per epoch from `order_seed`; resumes mid-epoch from a checkpoint
        return ResumableLoader(train, batch_size=self.batch_size, sampler=EpochShuffle(len(train), self.order_seed()),
                               drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.split("validation"), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
