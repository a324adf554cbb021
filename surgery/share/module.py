"""The Lightning module that trains a shared-depth model from its original as the teacher."""

from __future__ import annotations

from typing import Any

import torch

from surgery.eval.loss import cross_entropy
from surgery.models.loading import load_causal_lm
from surgery.share.build import ShareConfig, share_depth
from surgery.training.distill import DistillConfig, Distiller, Teacher, as_config
from surgery.training.lm import LMModule


class DepthSharing(LMModule):
    """Makes a pretrained model (GPT-2, GPT-NeoX, Llama-style) shared along depth (`surgery.share.share_depth`) and
    fine-tunes it towards the original (`distill`: KL to the original's logits and hidden-state alignment, plus
    the next-token loss); exports the shared model (each shared weight stored once) and, without a mixture of
    experts, its vanilla expansion to `<run>/model-expanded`.

    Args:
        init: the pretrained model (Hub name, local directory, or .ckpt); also the teacher.
        share: the layout (`surgery.share.ShareConfig`: groups, init, norms, relax_rank, moe_experts, moe_top_k).
        distill: the training losses (`surgery.training.distill.DistillConfig`); None: next-token loss only.
        moe_aux_weight: weight of the mixture of experts' load-balancing loss (mean over its uses in a forward).
        lr, min_lr_ratio, warmup_steps, weight_decay, betas: AdamW with warm-up + cosine, as in `CausalLM`.
    """

    def __init__(
        self,
        init: str,
        share: ShareConfig | None = None,
        distill: DistillConfig | None = None,
        moe_aux_weight: float = 0.01,
        lr: float = 5e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 15,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        tokenizer: Any = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.share = ShareConfig(**share) if isinstance(share, dict) else share or ShareConfig()
        original = load_causal_lm(init)
        self.model = share_depth(original, self.share)
        self.model.train()
        self.original = Teacher(original)  # not an nn.Module: out of parameters() and checkpoints
        self.distill = as_config(distill)
        self.distiller = Distiller(self.distill, self.original if self.distill.needs_teacher else None)
        self.spike_monitor: torch.Tensor | None = None
        self.original_val: dict | None = None

    def on_fit_start(self) -> None:
        if self.original_val is None:
            dm = self.trainer.datamodule
            self.original_val = cross_entropy(self.original.model, dm.split("validation"), dm.batch_size)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        out = self.distiller(self.model, batch)
        loss = out.loss
        for name, value in out.parts.items():
            if name != "ce":
                self.log(f"train/{name}", value)
        aux = self.model.pop_aux_losses()
        if aux:
            balance = torch.stack(aux).mean()
            loss = loss + self.hparams.moe_aux_weight * balance
            self.log("train/moe_balance", balance)
        self.spike_monitor = out.monitor
        self.log("train/loss", out.parts["ce"], prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["original_val"] = self.original_val

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.original_val = checkpoint.get("original_val")

    def run_metrics(self, exported, val: dict) -> dict:
        from surgery.share.report import share_report

        return share_report(self, val, self.trainer.default_root_dir)
