"""The two offline continual-learning settings: what a task's data, loss and score are.

- `SentimentTasks`: domain-incremental sentiment; a task is one VADER source (`movies`, `tweets`, `nyt`, `amazon`,
  see `surgery.ln_tune.sentiment`), a batch is `surgery.ln_tune.classify_data.pad_collate`'s dict, the model a
  2-way sequence classifier (all-MiniLM-L6-v2 by default), the score accuracy (share right; higher is better).
- `LMTasks`: domain-incremental language modelling; a task is one package of the standard library (`email`,
  `asyncio`, ...; `surgery.ln_tune.lm.StdlibPart`), a batch is token blocks (B, T), the model a causal LM, the score
  next-token cross-entropy (nats/token; lower is better).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from surgery.errors import SurgeryError


@dataclass
class TaskData:
    """One task: `train` (a loader, reshuffled each pass) and `test` (a fixed list of batches)."""

    name: str
    train: Any
    test: list


class SentimentTasks:
    """Args: model ("minilm" or a directory), max_train / max_test sentences per task (seeded subsets),
    max_length tokens per sentence, batch_size, threshold (|mean rating| below it dropped)."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, model: str = "minilm", max_train: int = 400, max_test: int = 200, max_length: int = 64,
                 batch_size: int = 32, threshold: float = 0.5):
        self.model_spec, self.max_train, self.max_test = model, max_train, max_test
        self.max_length, self.batch_size, self.threshold = max_length, batch_size, threshold

    def check(self, names: list[str]) -> None:
        from surgery.ln_tune.sentiment import SOURCES

        unknown = [n for n in names if n not in SOURCES]
        if unknown:
            raise SurgeryError(f"unknown sentiment task(s) {unknown}: a task is one VADER source, one of {list(SOURCES)}")

    def load_model(self, seed: int) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        from surgery.ln_tune.classify_data import resolve_model_dir

        torch.manual_seed(seed)  # the new head
        return AutoModelForSequenceClassification.from_pretrained(resolve_model_dir(self.model_spec), num_labels=2,
                                                                  use_safetensors=True)

    def task(self, name: str, seed: int) -> TaskData:
        from surgery.ln_tune.classify_data import SentimentData

        data = SentimentData(self.model_spec, [name], self.threshold, max_train=self.max_train,
                             max_test=self.max_test, max_length=self.max_length, batch_size=self.batch_size, seed=seed)
        return TaskData(name, data.train_dataloader(), list(data.test_dataloader()))

    @staticmethod
    def inputs(batch: dict) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    @staticmethod
    def score(logits: torch.Tensor, batch: dict) -> tuple[float, int]:
        """(right answers, examples)."""
        return float((logits.argmax(-1) == batch["labels"]).sum()), int(batch["labels"].shape[0])


class LMTasks:
    """Args: model (a causal-LM directory, e.g. checkpoints/tiny-gpt2-stdlib; its tokenizer is used), block_size
    tokens per block, batch_size blocks per step, max_test_blocks validation blocks per task (the first ones)."""

    metric, higher_is_better = "loss", False

    def __init__(self, model: str = "checkpoints/tiny-gpt2-stdlib", block_size: int = 128, batch_size: int = 8,
                 max_test_blocks: int = 32):
        self.model_spec, self.block_size, self.batch_size = model, block_size, batch_size
        self.max_test_blocks = max_test_blocks

    def check(self, names: list[str]) -> None:
        from surgery.ln_tune.lm import StdlibPartCorpus

        root = StdlibPartCorpus("stdlib").root()
        unknown = [n for n in names if not (root / n).is_dir()]
        if unknown:
            raise SurgeryError(f"unknown language-modelling task(s) {unknown}: a task is a package directory of the "
                               f"standard library in {root} (e.g. email, asyncio, json, unittest)")

    def load_model(self, seed: int) -> nn.Module:
        from surgery.models.loading import load_causal_lm

        torch.manual_seed(seed)
        return load_causal_lm(self.model_spec)

    def task(self, name: str, seed: int) -> TaskData:
        from torch.utils.data import DataLoader

        from surgery.ln_tune.lm import StdlibPart

        data = StdlibPart(name, tokenizer=self.model_spec, block_size=self.block_size, batch_size=self.batch_size,
                          max_val_blocks=self.max_test_blocks, seed=seed)
        return TaskData(name, data.train_dataloader(), list(DataLoader(data.split("validation"), self.batch_size)))

    @staticmethod
    def inputs(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": batch}

    @staticmethod
    def loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())

    @staticmethod
    def score(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
        """(summed next-token cross-entropy in nats, predicted tokens)."""
        targets = batch[:, 1:]
        total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return float(total), int(targets.numel())


SETTINGS = {"sentiment": SentimentTasks, "lm": LMTasks}
