"""A Lightning module that fine-tunes a sequence classifier with one of `surgery.ln_tune.methods`.

For the Fisher and random LN subsets, the mask is built at `setup("fit")` (Fisher: on the data
module's `fisher_batches`) and saved to `<run_dir>/masks.safetensors` (Fisher scores beside it in
`fisher.safetensors`). At the end of fit the merged plain model goes to `<run_dir>/model` and
test accuracy and loss before and after tuning, trainable entries and times to `<run_dir>/metrics.json`
(the generic LM export is off in these recipes: `export.enabled: false`), and the same numbers are printed as
a table; the run as a PEFT adapter goes to `<run_dir>/adapter`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from surgery.ln_tune.adapter import save_adapter
from surgery.ln_tune.classify_data import resolve_model_dir
from surgery.ln_tune.fisher import fisher_scores, label_log_likelihood
from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.methods import optimizer_groups, prepare
from surgery.ln_tune.tune import export, trainable_parameters
from surgery.training.report import Row, count_row, gap_rows, num, print_results


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """lr multiplier: linear up over `warmup` steps, then linear down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class SequenceClassifier(L.LightningModule):
    """Args:
        init: model directory ("minilm": all-MiniLM-L6-v2 from PyPI); a classification head is added.
        num_labels: classes. method: one of `surgery.ln_tune.methods.METHODS` (full, head, bitfit, ln, ln-attn,
            ln-fisher, ln-random, ln-mask, lora, lora-mlp, prefix, ln+lora, ln+lora-mlp, ln+prefix; prefix-tuning
            needs a decoder, so BERT/MiniLM refuse it).
        fraction: share of LN entries for ln-fisher / ln-random. mask: masks.safetensors for ln-mask.
        fisher_samples: sentences the empirical Fisher averages over. seed: random mask / head init.
        lr: peak learning rate (LN-tuning needs 1e-3..1e-2). weight_decay: AdamW decay on all trainable
            entries (masked-out entries never move). warmup_ratio: share of steps warming up.
        lora_r, lora_alpha: LoRA rank and scale. prefix_tokens: prefix-tuning's virtual tokens per layer.
        norm_lr: peak learning rate of the norms where it differs from `lr` (an ln+ combination); None: `lr`.
        save_model: write the merged model at the end of fit. save_adapter: also write the run as a PEFT adapter
            to `<run_dir>/adapter` (`surgery.ln_tune.adapter`; not for full fine-tuning or the head alone).
    """

    def __init__(self, init: str = "minilm", num_labels: int = 2, method: str = "ln", fraction: float = 0.1,
                 mask: str | None = None, fisher_samples: int = 256, seed: int = 0, lr: float = 5e-3,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.1, lora_r: int = 8, lora_alpha: int = 16,
                 prefix_tokens: int = 8, norm_lr: float | None = None, save_model: bool = True,
                 save_adapter: bool = True, tokenizer: Any = None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        torch.manual_seed(seed)  # the new head's initialisation
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_dir(init), num_labels=num_labels, use_safetensors=True)
        self.mask: EntryMask | None = None
        self.test_before: dict | None = None  # evaluate() of the test split before training
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
                                        seed=hp.seed, lora_r=hp.lora_r, lora_alpha=hp.lora_alpha,
                                        prefix_tokens=hp.prefix_tokens)
        if self.mask is not None:
            self.mask.metadata.update({"method": hp.method, "model": str(hp.init)})
            self.mask.save(self._run_dir() / "masks.safetensors")
        self.times["select_s"] = round(time.perf_counter() - start, 2)
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "test_dataloader"):  # the new head starts near chance
            self.test_before = self.evaluate(dm.test_dataloader())
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
        opt = torch.optim.AdamW(optimizer_groups(self.model, hp.lr, hp.norm_lr), lr=hp.lr, weight_decay=hp.weight_decay)
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
        test = self.evaluate(self.trainer.datamodule.test_dataloader())
        metrics = {"method": self.hparams.method, "trainable": self.trainable(), **self.times,
                   "steps": self.trainer.global_step, "test_accuracy": round(test["accuracy"], 4),
                   "test": test, "test_before": self.test_before}
        if self.test_before is not None:
            metrics["gap_vs_before"] = {k: test[k] - self.test_before[k] for k in ("accuracy", "loss")}
        if self.hparams.save_adapter and self.hparams.method not in ("full", "head"):
            if self.mask is not None:
                self.mask.remove_hooks()
            save_adapter(self.model, run_dir / "adapter", norms="attn" if self.hparams.method == "ln-attn" else "all",
                         mask=self.mask)
        if self.hparams.save_model:
            self.model = self.export_model()
            self.model.save_pretrained(run_dir / "model")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(run_dir / "model")
        write_json(run_dir / "metrics.json", metrics)
        print_results("LN-tuning (sequence classification): results", result_rows(metrics))
        self.metrics = metrics

    def trainable(self) -> int:
        return trainable_parameters(self.model, self.mask)

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """{"accuracy": share right, "loss": mean cross-entropy (nats/example), "examples": count} over `loader`."""
        was = self.model.training
        self.model.eval()
        right = total = 0
        loss = 0.0
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self(batch)
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            loss += torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
            total += batch["labels"].shape[0]
        self.model.train(was)
        return {"accuracy": right / total, "loss": loss / total, "examples": total}

    def accuracy(self, loader) -> float:
        return self.evaluate(loader)["accuracy"]

    def export_model(self):
        return export(self.model)


def result_rows(metrics: dict) -> list[Row]:
    """The rows of the end-of-run table and the model card of a classification run, from metrics.json: the
    accuracy gap to the model before tuning first (percentage points; the new head starts near chance), test
    accuracy and loss before and after, the test examples behind each, the trainable parameters."""
    before, test = metrics.get("test_before") or {}, metrics.get("test") or {}
    gap = (metrics.get("gap_vs_before") or {}).get("accuracy")
    rows = gap_rows({"gap_vs_original": gap}, "tuned", "before tuning", unit="test accuracy, points",
                    fmt=lambda v: f"{100 * v:+.1f}")
    if "accuracy" in before:
        rows.append(("test accuracy before tuning", f"{100 * before['accuracy']:.1f}%"))
    rows.append((f"test accuracy ({metrics.get('method')})", f"{100 * metrics['test_accuracy']:.1f}%"))
    if "loss" in before and "loss" in test:
        rows.append(("test loss before tuning (nats/example)", num(before["loss"])))
        rows.append(("test loss (nats/example)", num(test["loss"])))
    rows += count_row({"before tuning": before.get("examples"), "after": test.get("examples")},
                      what="test examples", of="each figure")
    rows.append(("trainable parameters", num(metrics.get("trainable"))))
    return rows
