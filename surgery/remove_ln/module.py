"""The Lightning module for LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al. 2025)."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch

from surgery.training.distill import DistillConfig, Distiller, as_config, lm_cross_entropy
from surgery.errors import SurgeryError
from surgery.eval.loss import cross_entropy
from surgery.families import blocks
from surgery.models.loading import PREPARE_KEY
from surgery.training.lm import CausalLM
from surgery.remove_ln.calibrate import calibrate
from surgery.remove_ln.export import export_ln_free
from surgery.remove_ln.fake_ln import per_token_std
from surgery.remove_ln.points import point_kinds, prepare_for_removal, token_context
from surgery.remove_ln.schedule import RemovalCallback, RemovalSchedule
from surgery.remove_ln.uniformity import ScaleUniformity


def std_uniformity_loss(x: torch.Tensor, keep: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean squared deviation of each kept token's std from their (detached) mean std.

    x: (B, T, d) input of the final LN; keep: (B, T) bool (not the first position, not end-of-text); eps: the
    final LN's own, inside the square root as the LN has it (without it, a token of zero variance, even one left
    out by `keep`, makes the gradient NaN: 0 x the infinite slope of the root at 0).
    """
    std, w = per_token_std(x.float(), eps), keep.float()  # weights, not boolean indexing: no data-dependent shape
    n = w.sum().clamp_min(1.0)
    mean = ((std * w).sum() / n).detach()
    return ((std - mean).pow(2) * w).sum() / n


class LNRemoval(CausalLM):
    """Fine-tunes a pretrained model (GPT-2, GPT-NeoX, Llama-style) while its norms go fake on a schedule; exports an LN-free model.

    Args:
        init: the pretrained model (Hub name, local directory, or .ckpt).
        schedule: when each LayerNorm goes fake.
        sigma_source: "moving_average" (momentum average of the mean per-token std, frozen at removal;
            Baroni et al. 2025) or "table" (measured once on `calibration_batches` training batches
            before training; Heimersheim 2024).
        momentum: moving-average momentum.
        calibration_batches: batches measured for the table.
        aux_loss_weight: weight of the loss that pulls each token's std at the final LN's input
            towards the mean std (0 turns it off).
        uniformity_weight: weight of the loss that pulls each token's scale at the inputs of the QK-norms and
            post-sublayer norms towards their mean scale (`surgery.remove_ln.uniformity`; 0 turns it off).
        keep_ln: control run: fine-tune with every LayerNorm kept, same everything else.
        control: also train an LN-kept twin on the very same batches (same losses, same optimizer
            settings, its own gradient clipping), so that one run reports original, control and LN-free losses.
        distill: the training losses (`surgery.training.distill.DistillConfig`): next-token cross-entropy and/or
            KL to the original model and hidden-state alignment with it; None: cross-entropy only.
        lr, min_lr_ratio, warmup_steps, weight_decay, betas, compile: as in `CausalLM` (`compile` compiles
            `step_losses`).
    """

    def __init__(
        self,
        init: str,
        schedule: RemovalSchedule | None = None,
        sigma_source: Literal["moving_average", "table"] = "moving_average",
        momentum: float = 0.9,
        calibration_batches: int = 8,
        aux_loss_weight: float = 0.1,
        uniformity_weight: float = 0.0,
        keep_ln: bool = False,
        control: bool = False,
        distill: DistillConfig | None = None,
        lr: float = 6e-4,
        min_lr_ratio: float = 0.5,
        warmup_steps: int = 25,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        tokenizer: Any = None,
    ):
        super().__init__(init=init, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, betas=betas, compile=compile, tokenizer=tokenizer)
        # a dict when rebuilt from a checkpoint's hyperparameters (`load_from_checkpoint`)
        self.schedule = RemovalSchedule(**schedule) if isinstance(schedule, dict) else schedule or RemovalSchedule()
        self.control = copy.deepcopy(self.model) if control and not keep_ln else None
        self.distill = as_config(distill)
        # The teacher is a frozen copy of the model as loaded (the original), rebuilt from `init` on resume.
        self.distiller = Distiller(self.distill, copy.deepcopy(self.model) if self.distill.needs_teacher else None)
        self.spike_monitor: torch.Tensor | None = None
        self.points = {} if keep_ln else prepare_for_removal(self.model, momentum)
        self.removal = None
        if not keep_ln:
            self.schedule.removal_steps(self.n_blocks(), point_kinds(self.points))  # refuse a bad schedule before training
            self.removal = RemovalCallback(self.schedule, self.points)
        self.original_val: dict | None = None
        self._ln_f_input: torch.Tensor | None = None
        if self.points and aux_loss_weight > 0:
            self.points["ln_f"].register_forward_pre_hook(self._keep_ln_f_input)
        self.uniformity = ScaleUniformity(self.points) if self.points and uniformity_weight > 0 else None

    def _keep_ln_f_input(self, module, args) -> None:
        self._ln_f_input = args[0]

    def configure_callbacks(self):
        return [self.removal] if self.removal else []

    def n_blocks(self) -> int:
        return len(blocks(self.model))

    # -- training ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.removal is not None:
            last = self.schedule.last_step(self.n_blocks(), point_kinds(self.points))
            if 0 < self.trainer.max_steps <= last:
                raise SurgeryError(
                    f"trainer.max_steps={self.trainer.max_steps} ends before the removal schedule does (its last "
                    f"event is at step {last}): the run needs trainer.max_steps >= {last + 1}; raise trainer.max_steps "
                    f"or shorten model.init_args.schedule"
                )
        dm = self.trainer.datamodule
        self.distiller.attach_cache(dm.split("train").tokens, dm.block_size)
        if self.original_val is None:
            original = self.control if self.control is not None else self.model
            self.original_val = cross_entropy(original, dm.split("validation"), dm.batch_size)
        if self.removal is not None and self.hparams.sigma_source == "table" and self.removal.table is None:
            self.removal.table = calibrate(self.model, self.points, dm.train_dataloader(), self.hparams.calibration_batches, dm.tokenizer.eos_token_id)

    def step_losses(self, batch: torch.Tensor, teacher_out=None) -> dict[str, torch.Tensor]:
        """The training step's forwards and losses on batch (B, T), nothing else (the part `compile` compiles):
        "loss" (with gradients), "monitor" (the guard's CE, student plus control) and detached parts ("lm_loss",
        "kl", "hidden", "aux_loss", "control_loss" where they apply). `teacher_out`: cached targets, else the
        teacher runs inside."""
        out = self.distiller(self.model, batch, teacher_out)
        loss, monitor = out.loss, out.monitor
        result = {"lm_loss": out.parts["ce"], **{k: v for k, v in out.parts.items() if k != "ce"}}
        keep = batch != self.tokenizer.eos_token_id  # the tokens the auxiliary losses judge
        keep = torch.cat([torch.zeros_like(keep[:, :1]), keep[:, 1:]], dim=1)
        if self.uniformity is not None:
            uniformity = self.uniformity.loss(keep)
            loss = loss + self.hparams.uniformity_weight * uniformity
            result["uniformity_loss"] = uniformity.detach()
        if self._ln_f_input is not None:
            aux = std_uniformity_loss(self._ln_f_input, keep, self.points["ln_f"].eps)
            self._ln_f_input = None
            loss = loss + self.hparams.aux_loss_weight * aux
            result["aux_loss"] = aux.detach()
        if self.control is not None:
            twin = self.distiller(self.control, batch, teacher_out=out.teacher)
            loss = loss + twin.loss
            monitor = monitor + twin.monitor
            result["control_loss"] = twin.parts["ce"]
        return {"loss": loss, "monitor": monitor, **result}

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        if self.points:
            token_context(self.points).eot_mask = batch == self.tokenizer.eos_token_id
        teacher_out = self.distiller.cached_teacher(batch)  # None for a live teacher: it runs inside step_losses
        result = self.compiled(self.step_losses)(batch, teacher_out)
        if self.points:
            token_context(self.points).flush()  # this batch's std measurements into the moving averages
        self.spike_monitor = result.pop("monitor")  # the guard judges cross-entropy, not a KL that starts near 0
        for name, value in result.items():
            if name not in ("loss", "lm_loss"):
                self.log(f"train/{name}", value)
        self.log("train/loss", result["lm_loss"], prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return result

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if self.points:
            token_context(self.points).eot_mask = batch == self.tokenizer.eos_token_id
        super().validation_step(batch, batch_idx)
        if self.control is not None:
            loss = lm_cross_entropy(self.control, batch)
            self.log("val/control_loss", loss, batch_size=batch.shape[0], sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.control is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:  # the twin must not change the removal model's clipping, nor the reverse
            for m in (self.model, self.control):
                torch.nn.utils.clip_grad_norm_(m.parameters(), gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["original_val"] = self.original_val
        if self.points:  # the loader rebuilds the switchable norms before reading their weights
            checkpoint[PREPARE_KEY] = f"{prepare_for_removal.__module__}:{prepare_for_removal.__name__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.original_val = checkpoint.get("original_val")

    # -- results -------------------------------------------------------------------------------
    def export_model(self):
        return self.model if self.removal is None else export_ln_free(self.model)

    def run_metrics(self, exported, val: dict) -> dict:
        from surgery.remove_ln.report import removal_report

        return removal_report(self, exported, val, self.trainer.default_root_dir)
