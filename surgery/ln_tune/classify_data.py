"""Sentence-classification data for LN-tuning: the VADER human-rated sentences, tokenized once and cached."""

from __future__ import annotations

import hashlib
import json

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from surgery.errors import SurgeryError
from surgery.ln_tune.sentiment import SOURCES, labelled_split
from surgery.models.paths import cache_dir


def resolve_model_dir(name: str) -> str:
    """"minilm" -> the all-MiniLM-L6-v2 directory shipped on PyPI; anything else is returned unchanged."""
    if name == "minilm":
        from surgery.ln_tune.offline import minilm_dir

        return str(minilm_dir())
    return name


def pad_collate(items: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads to the longest sequence of the batch: input_ids, attention_mask (B, T) and labels (B,)."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": torch.tensor([y for _, y in items])}


class LengthBuckets(Sampler[list[int]]):
    """Shuffled batches of similar-length sentences (less padding): shuffle, sort within windows of
    `window` batches by length, cut into batches, shuffle the batches. Seeded; a new order each epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, window: int = 50):
        self.lengths, self.batch_size, self.seed, self.window = lengths, batch_size, seed, window
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for j in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[j]


class SentimentData(L.LightningDataModule):
    """Positive/negative sentences (see `surgery.ln_tune.sentiment` for the labelling rule).

    Args:
        tokenizer: tokenizer directory, or "minilm" for all-MiniLM-L6-v2's.
        sources: which rated sets to use (movies, tweets, nyt, amazon).
        threshold: |mean rating| below this is near-neutral and dropped.
        test_fraction: share of sentences (by a hash of their id) held out; validation runs on them.
        max_train, max_test: random subsets of that many sentences (seeded); None keeps all.
        max_length: tokens per sentence, [CLS] and [SEP] included.
        batch_size: sentences per batch. seed: seed of the subsets and of the training order.
    """

    def __init__(self, tokenizer: str = "minilm", sources: list[str] | None = None, threshold: float = 0.5,
                 test_fraction: float = 0.2, max_train: int | None = 3000, max_test: int | None = 1000,
                 max_length: int = 64, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.sources = tuple(sources or SOURCES)
        self.tokenizer_spec, self.threshold, self.test_fraction = tokenizer, threshold, test_fraction
        self.max_train, self.max_test, self.max_length = max_train, max_test, max_length
        self.batch_size, self.seed = batch_size, seed
        self._tokenizer = None
        self._splits: dict[str, list[tuple[list[int], int]]] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from surgery.models.loading import load_tokenizer

            self._tokenizer = load_tokenizer(resolve_model_dir(self.tokenizer_spec))
        return self._tokenizer

    def split(self, name: str) -> list[tuple[list[int], int]]:
        """[(token ids, label)] of "train" or "test", subset as configured, cached on disk."""
        if name not in self._splits:
            limit = self.max_train if name == "train" else self.max_test
            tok_hash = hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]
            key = json.dumps([self.sources, self.threshold, self.test_fraction, limit, self.max_length, self.seed,
                              tok_hash, name])
            path = cache_dir() / "sentiment" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
            if path.exists():
                self._splits[name] = [tuple(x) for x in json.loads(path.read_text())]
            else:
                pairs = labelled_split(name, self.sources, self.threshold, self.test_fraction)
                if limit is not None and limit < len(pairs):
                    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed))
                    pairs = [pairs[i] for i in sorted(order[:limit].tolist())]
                if not pairs:
                    raise SurgeryError(f"no {name} sentences left with threshold {self.threshold}")
                enc = self.tokenizer([t for t, _ in pairs], truncation=True, max_length=self.max_length)["input_ids"]
                self._splits[name] = [(ids, y) for ids, (_, y) in zip(enc, pairs)]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self._splits[name]))
        return self._splits[name]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id or 0
        data = self.split(name)
        lengths = [len(ids) for ids, _ in data]
        if shuffle:
            sampler = LengthBuckets(lengths, self.batch_size, self.seed)
        else:  # fixed batches of sorted lengths: the order does not change accuracy
            order = sorted(range(len(data)), key=lambda i: lengths[i])
            sampler = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return DataLoader(data, batch_sampler=sampler, collate_fn=lambda items: pad_collate(items, pad))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def fisher_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The first `n` training sentences (file order), in batches: the Fisher sample."""
        items = self.split("train")[:n]
        pad = self.tokenizer.pad_token_id or 0
        return [pad_collate(items[i : i + self.batch_size], pad) for i in range(0, len(items), self.batch_size)]
