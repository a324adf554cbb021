"""A tiny LN-removal run for the reliability tests: a random 2-layer GPT-2 (width 32, vocabulary 4096 of
the shipped tiny tokenizer, dropout 0.1 so that the RNG state matters), a 30-document corpus from the
stdlib's textwrap.py, and a recipe of 16 steps whose removals run from step 3 to step 14.

Train split: 83 blocks of 32 tokens = 10 batches of 8 per epoch, so step 12 is mid-way through epoch 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "checkpoints" / "tiny-gpt2-stdlib"
REMOVAL_STEPS = {"h.0.ln_2": 3, "h.1.ln_2": 4, "h.0.ln_1_qk": 5, "h.1.ln_1_qk": 6, "h.0.ln_1_v": 8, "h.1.ln_1_v": 10, "ln_f": 14}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def write_setup(root: Path, dropout: float = 0.1) -> Path:
    """Writes `init/` (model + tokenizer), `corpus.jsonl` and `recipe.yaml` under `root`; returns the recipe."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=dropout, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    paragraphs = [p for p in (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().split("\n\n") if p.strip()]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:30]))
    recipe = {
        "seed_everything": 3,
        "trainer": {"max_steps": 16, "val_check_interval": 8, "check_val_every_n_epoch": None, "limit_val_batches": 2,
                    "num_sanity_val_steps": 0, "gradient_clip_val": 1.0, "log_every_n_steps": 1, "accelerator": "cpu",
                    "devices": 1},
        "model": {"class_path": "surgery.remove_ln.module.LNRemoval", "init_args": {
            "init": str(root / "init"),
            "schedule": {"start": 3, "gaps": {"ln_2": 1, "ln_1_qk": 1, "ln_1_v": 2, "ln_f": 4}},
            "aux_loss_weight": 0.1, "lr": 1.0e-3, "warmup_steps": 2}},
        "data": {"class_path": "surgery.data.TokenBlocks", "init_args": {
            "data": str(root / "corpus.jsonl"), "tokenizer": str(root / "init"), "val_fraction": 0.2,
            "block_size": 32, "batch_size": 8}},
        "checkpoint": {"every_n_train_steps": 4},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fit_args(recipe: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir), *QUIET, *extra]


def fit_subprocess(args: list[str], cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`surgery <args>` in a fresh process (one CPU thread; this directory importable for test callbacks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURGERY_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "surgery.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


class KillAt(L.Callback):
    """SIGKILLs its own process at the start of optimizer step `step` (no cleanup, no final checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


from surgery.remove_ln.module import LNRemoval  # noqa: E402


class SpikyRemoval(LNRemoval):
    """LNRemoval whose training loss (and the cross-entropy the guard watches) is multiplied by
    `spikes[step]` at the given steps (nan: a NaN loss; "nan-grad": the same loss with a NaN gradient)."""

    def __init__(self, *args, spikes: dict[int, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spikes = spikes or {}

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        factor = self.spikes.get(self.trainer.global_step)
        if factor == "nan-grad":  # the loss unchanged, its gradient NaN: 0 x the infinite slope of sqrt at 0
            out["loss"] = out["loss"] + (next(self.model.parameters()).sum() * 0).sqrt()
        elif factor is not None:
            out["loss"] = out["loss"] * factor
            self.spike_monitor = self.spike_monitor * factor
        return out


class DumpState(L.Callback):
    """At the end of training each rank writes `<dir>/rank<global_rank>.pt`: the module's state dict
    (weights and buffers: sigma, moving averages, fake flags) and the removal log."""

    def __init__(self, dir: str):
        self.dir = dir
        self.batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(int(batch.sum()))

    def on_train_end(self, trainer, pl_module) -> None:
        removal = getattr(pl_module, "removal", None)
        ddp = trainer.strategy.model
        state = {"state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                 "removed": list(removal.removed) if removal else [], "world_size": trainer.world_size,
                 "batches": self.batches, "broadcast_buffers": getattr(ddp, "broadcast_buffers", None)}
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(self.dir) / f"rank{trainer.global_rank}.pt")
