"""A Lightning module that fine-tunes a sequence classifier with one of `surgery.ln_tune.methods`.

For the Fisher and random LN subsets, the mask is built at `setup("fit")` (Fisher: on the data
module's `fisher_batches`) and saved to `<run_dir>/masks.safetensors` (Fisher scores beside it in
`fisher.safetensors`). At the end of fit the merged plain model goes to `<run_dir>/model` and
accuracy, trainable entries and times to `<run_dir>/metrics.json` (the generic LM export is off
in these recipes: `export.enabled: false`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from surgery.ln_tune.classify_data import resolve_model_dir
from surgery.ln_tune.fisher import fisher_scores, label_log_likelihood
from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.methods import prepare
from surgery.ln_tune.tune import export, trainable_parameters


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """lr multiplier: linear up over `warmup` steps, then linear down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class SequenceClassifier(L.LightningModule):
    """Args:
        init: model directory ("minilm": all-MiniLM-L6-v2 from PyPI); a classification head is added.
        num_labels: classes. method: full | head | bitfit | ln | ln-fisher | ln-random | lora | ln-mask.
        fraction: share of LN entries for ln-fisher / ln-random. mask: masks.safetensors for ln-mask.
        fisher_samples: sentences the empirical Fisher averages over. seed: random mask / head init.
        lr: peak learning rate (LN-tuning needs 1e-3..1e-2). weight_decay: AdamW decay on all trainable
            entries (masked-out entries never move). warmup_ratio: share of steps warming up.
        lora_r, lora_alpha: LoRA rank and scale. save_model: write the merged model at the end of fit.
    """

    def __init__(self, init: str = "minilm", num_labels: int = 2, method: str = "ln", fraction: float = 0.1,
                 mask: str | None = None, fisher_samples: int = 256, seed: int = 0, lr: float = 5e-3,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.1, lora_r: int = 8, lora_alpha: int = 16,
                 save_model: bool = True, tokenizer: Any = None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        torch.manual_seed(seed)  # the new head's initialisation
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_dir(init), num_labels=num_labels, use_safetensors=True)
        self.mask: EntryMask | None = None
        self.times: dict[str, float] = {}
        self._prepared = False

    def setup(self, stage: str) -> None:
        if self._prepared:
            return
        hp = self.hparams
        start = time.perf_counter()

        def fisher(model):
            scores = fisher_scores(model, self.trainer.datamodule.fisher_batches(hp.fisher_samples), label_log_likelihood)
            save_file({n: s.float() for n, s in scores.items()}, str(self._run_dir() / "fisher.safetensors"),
                      metadata={"samples": str(hp.fisher_samples)})
            return scores

        self._run_dir().mkdir(parents=True, exist_ok=True)
        self.model, self.mask = prepare(self.model, hp.method, fraction=hp.fraction, fisher=fisher, mask=hp.mask,
                                        seed=hp.seed, lora_r=hp.lora_r, lora_alpha=hp.lora_alpha)
        if self.mask is not None:
            self.mask.metadata.update({"method": hp.method, "model": str(hp.init)})
            self.mask.save(self._run_dir() / "masks.safetensors")
        self.times["select_s"] = round(time.perf_counter() - start, 2)
        self._prepared = True

    def _run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) if self._trainer is not None else Path(".")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        n = batch["labels"].shape[0]
        self.log("val/loss", torch.nn.functional.cross_entropy(logits, batch["labels"]), batch_size=n, prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == batch["labels"]).float().mean(), batch_size=n, prog_bar=True)

    test_step = validation_step

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = max(1, int(hp.warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup_decay(s, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.mask is not None:
            self.mask.restore(self.model)

    def on_fit_start(self) -> None:
        self.times["fit_start"] = time.perf_counter()

    def on_train_end(self) -> None:
        self.times["train_s"] = round(time.perf_counter() - self.times.pop("fit_start", time.perf_counter()), 2)

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        from surgery.training.run import write_json

        run_dir = self._run_dir()
        metrics = {"method": self.hparams.method, "trainable": self.trainable(), **self.times,
                   "steps": self.trainer.global_step,
                   "test_accuracy": round(self.accuracy(self.trainer.datamodule.test_dataloader()), 4)}
        if self.hparams.save_model:
            self.model = self.export_model()
            self.model.save_pretrained(run_dir / "model")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(run_dir / "model")
        write_json(run_dir / "metrics.json", metrics)
        self.metrics = metrics

    def trainable(self) -> int:
        return trainable_parameters(self.model, self.mask)

    @torch.no_grad()
    def accuracy(self, loader) -> float:
        was = self.model.training
        self.model.eval()
        right = total = 0
        for batch in loader:
            right += int((self(batch).argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].shape[0]
        self.model.train(was)
        return right / total

    def export_model(self):
        return export(self.model)
