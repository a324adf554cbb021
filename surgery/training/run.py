"""The run directory: the exported model, `metrics.json`, plots. Written at the end of `surgery fit`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from surgery.eval.loss import cross_entropy


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def sources(pl_module: L.LightningModule, datamodule) -> dict:
    """Where the run's starting model (`init` or `source` of the module) and its data came from, as resolved
    while it trained: {"started_from" / "trained_on": {"name": as given, "local_path": absolute path, or None for the
    Hub}}. A relative local path given in a recipe means nothing elsewhere; `surgery publish` names only Hub ones."""
    from surgery.errors import SurgeryError
    from surgery.models.loading import resolve

    out = {}
    hp = getattr(pl_module, "hparams", {})
    init = hp.get("init") or hp.get("source")
    if isinstance(init, str):
        try:
            ref, local = resolve(init)
        except SurgeryError:
            ref, local = init, True
        out["started_from"] = {"name": init, "local_path": ref if local else None}
    corpus = getattr(datamodule, "corpus", None)
    if corpus is not None:
        try:
            local = corpus.files() is not None
        except SurgeryError:
            local = True
        out["trained_on"] = {"name": corpus.source, "local_path": str(corpus.root().resolve()) if local else None}
    return out


class ExportRun(L.Callback):
    """At the end of fit: save the exported model and tokenizer to `<run_dir>/model`, evaluate it on the
    validation split and write `<run_dir>/metrics.json` (plus where the run started from and its data, see
    `sources`, and whatever the module adds via `run_metrics(exported, val)`).

    Args:
        enabled: turn the export off (e.g. for quick experiments).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._start, self._before = time.time(), 0.0  # _before: training time of the runs this one resumes
        self._tokens: int | None = 0  # training tokens counted batch by batch (None: unknown, e.g. an older checkpoint)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.time()

    def train_time_s(self) -> float:
        return self._before + time.time() - self._start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if self._tokens is not None:  # counted as trained, so a resume with another batch size is counted right
            self._tokens = self._tokens + ids.numel() * trainer.world_size if isinstance(ids, torch.Tensor) else None

    def state_dict(self) -> dict[str, float]:
        return {"train_time_s": self.train_time_s(), "tokens_seen": self._tokens}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._before = float(state.get("train_time_s", 0.0))
        self._tokens = state.get("tokens_seen")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        out = run_dir / "model"
        model = pl_module.export_model()
        model.save_pretrained(out)
        if getattr(pl_module, "tokenizer", None) is not None:
            pl_module.tokenizer.save_pretrained(out)
        dm = trainer.datamodule
        batch_size, block_size = dm.batch_size, dm.block_size
        metrics = {
            "steps": trainer.global_step,
            "tokens_seen": self._tokens if self._tokens is not None else
            trainer.global_step * batch_size * block_size * trainer.accumulate_grad_batches * trainer.world_size,
            "train_time_s": round(self.train_time_s(), 1),
            "val": cross_entropy(model, dm.split("validation"), batch_size),
        }
        metrics.update(sources(pl_module, dm))
        changes = run_dir / "resume_changes.json"  # settings changed on resume (--checkpoint.accept_changes)
        if changes.exists():
            metrics["resumed_with_changes"] = json.loads(changes.read_text())
        if hasattr(pl_module, "run_metrics"):
            metrics.update(pl_module.run_metrics(model, metrics["val"]))
        write_json(run_dir / "metrics.json", metrics)
        print(f"exported {out} | val loss {metrics['val']['loss']:.4f} nats/token | metrics in {run_dir / 'metrics.json'}")
