"""Training a hybrid (of any family in surgery.families) with cross-architecture transfer: the module, its
stages and the freeze -> unfreeze schedule.

Stages, by optimizer step (one `surgery fit` run; the stage follows from the step, so a resumed run is in
the stage it left): 1. attention alignment (`align.steps` > 0): each mixer learns to reproduce the source's
attention output from the source's own attention input (surgery.xatl.training.align); 2. training with the
`distill` losses (KL to the source, hidden-state alignment and/or next-token CE; surgery.training.distill); 3. from
`lm_after`, the next-token loss alone. Without `align` and `distill`, training is the next-token loss
throughout (the XATL paper's recipe). The source, frozen, is the teacher; it is no module attribute, so it
is neither optimized nor saved (a resumed run loads it again from `source`).

Transferred weights start frozen (requires_grad False: AdamW leaves them bit-identical) while the mixers
train; at the unfreeze step they join training as their own parameter groups, with their own linear
warm-up from that step (the XATL recipe). The step is fixed (`UnfreezeSchedule.step`) or chosen when the
relative improvement of the mean training loss between consecutive windows falls below `threshold`; with
neither, never.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch

from surgery.training.distill import DistillConfig, Distiller, Teacher, as_config, lm_cross_entropy
from surgery.errors import SurgeryError
from surgery.training.lm import LMModule, adamw_kernel, cosine_with_warmup, decays
from surgery.training.report import print_results
from surgery.xatl.training.report import result_rows
from surgery.models.loading import load_causal_lm
from surgery.xatl.training.align import AttentionAligner
from surgery.xatl.training.auto_layers import check_criterion, choose_layers, rank_layers
from surgery.xatl.hybrid.model import hybrid_config_from, hybrid_model
from surgery.xatl.transfer.weights import DEFAULT_COMPONENTS, transfer_shared_weights


@dataclass
class UnfreezeSchedule:
    """When transferred weights start training.

    Args:
        step: optimizer step at which to unfreeze (None: only the threshold decides).
        threshold: unfreeze when (prev_window_loss - window_loss) / prev_window_loss < threshold
            (None: only `step` decides). window: training steps per window. Both None: never; the
            transferred weights stay as copied and only what was not copied trains.
        warmup_steps: linear lr warm-up of the transferred weights after unfreezing.
        lr_ratio: their peak lr as a share of the model's lr schedule.
    """

    step: int | None = 100
    threshold: float | None = None
    window: int = 50
    warmup_steps: int = 50
    lr_ratio: float = 1.0


@dataclass
class AutoAttn:
    """`attn_layers: auto`: keep softmax attention at the `keep` layers whose replacement costs most after a
    probe of `steps` alignment steps (lr `lr`, seed `seed`) on the first `batches` training batches; the
    cost by `criterion`: "kl" (KL from the source to the source with that layer alone replaced by its probe
    mixer) or "alignment" (the mixer's alignment error) (surgery.xatl.training.auto_layers)."""

    keep: int = 1
    steps: int = 50
    batches: int = 8
    lr: float = 2e-3
    seed: int = 0
    criterion: str = "kl"

    def __post_init__(self):
        check_criterion(self.criterion)


@dataclass
class AlignStage:
    """Stage 1: `steps` optimizer steps of attention alignment (0: none), loss "normalized_mse" | "mse" |
    "cosine" between each mixer's output and the source attention's output."""

    steps: int = 0
    loss: str = "normalized_mse"


class UnfreezeTransferred(L.Callback):
    """Unfreezes `pl_module.transferred` when the schedule says so; its state lives in the checkpoint."""

    def __init__(self, schedule: UnfreezeSchedule):
        self.schedule = schedule
        self.window_losses: list[float] = []
        self.prev_window_loss: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        s = self.schedule
        if s.step is None or pl_module.unfrozen_at is not None or not 0 < trainer.max_steps <= s.step:
            return
        problem = (f"trainer.max_steps={trainer.max_steps} ends before model.init_args.unfreeze.step={s.step}: the transferred "
                   "weights would stay frozen")
        if s.threshold is None:
            raise SurgeryError(f"{problem} for the whole run. Raise trainer.max_steps above {s.step}, lower unfreeze.step, "
                               "or set model.init_args.freeze false")
        print(f"xatl: warning: {problem} unless the loss threshold unfreezes them first")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.unfrozen_at is not None:
            return
        s, step = self.schedule, trainer.global_step
        reason = None
        if s.step is not None and step >= s.step:
            reason = f"step {s.step}"
        elif s.threshold is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.window_losses.append(float(loss))
            if len(self.window_losses) >= s.window:
                cur = sum(self.window_losses) / len(self.window_losses)
                self.window_losses = []
                if self.prev_window_loss is not None:
                    rel = (self.prev_window_loss - cur) / self.prev_window_loss
                    if rel < s.threshold:
                        reason = f"relative improvement {rel:.4f} < {s.threshold}"
                self.prev_window_loss = cur
        if reason:
            pl_module.unfreeze(step)
            print(f"xatl: unfroze {len(pl_module.transferred)} transferred tensors at step {step} ({reason})")

    def state_dict(self) -> dict:
        return {"window_losses": self.window_losses, "prev_window_loss": self.prev_window_loss}

    def load_state_dict(self, state: dict) -> None:
        self.window_losses = list(state["window_losses"])
        self.prev_window_loss = state["prev_window_loss"]


class XatlLM(LMModule):
    """A hybrid twin of `source` (surgery.xatl.hybrid.model: the source's own class with mixers in place of attention;
    same width, depth, vocabulary), trained with the next-token loss of `LMModule` or distilled from the source.

    Args:
        source: the GPT-2, GPT-NeoX/Pythia or Llama-style model to copy: Hub name, directory, .ckpt.
        mixer: "mamba" | "retention" | "gla". mixer_config: the mixer's options (e.g. {"d_state": 16}).
        attn_layers: blocks that keep softmax attention (copied whole with "attn_layers"); "auto": chosen
            by `auto_attn` when training starts. auto_attn: see AutoAttn.
        transfer: components copied from the source (see transfer_shared_weights); [] trains the same
            architecture from scratch (the control).
        freeze: freeze the transferred weights until `unfreeze` says otherwise (its step counts from 0, the
            alignment stage included).
        align: stage 1 (see AlignStage); needs a transfer (the source is the teacher).
        distill: the losses of stage 2 (`surgery.training.distill.DistillConfig`); None: next-token loss.
        lm_after: step from which only the next-token loss trains (stage 3); None: never.
        compile: run the distill and lm stages' forwards and losses (`step_losses`) through `torch.compile`.
        lr, min_lr_ratio, warmup_steps, weight_decay, betas: as in `CausalLM` (for the mixers).
    """

    def __init__(self, source: str, mixer: str = "mamba", mixer_config: dict[str, Any] | None = None,
                 attn_layers: list[int] | Literal["auto"] | None = None, auto_attn: AutoAttn | None = None,
                 transfer: list[str] = list(DEFAULT_COMPONENTS),
                 freeze: bool = True, unfreeze: UnfreezeSchedule | None = None, lr: float = 1e-3,
                 min_lr_ratio: float = 0.1, warmup_steps: int = 50, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), align: AlignStage | None = None,
                 distill: DistillConfig | None = None, lm_after: int | None = None, compile: bool = False,
                 tokenizer: Any = None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        src = load_causal_lm(source)
        if tokenizer is not None and len(tokenizer) > src.config.vocab_size:
            raise SurgeryError(f"the tokenizer has {len(tokenizer)} entries but {source!r} embeds only "
                               f"{src.config.vocab_size}: set data.tokenizer to the source's tokenizer")
        self.unfreeze_schedule = UnfreezeSchedule(**unfreeze) if isinstance(unfreeze, dict) else unfreeze or UnfreezeSchedule()
        self.align = AlignStage(**align) if isinstance(align, dict) else align or AlignStage()
        self.auto_attn = AutoAttn(**auto_attn) if isinstance(auto_attn, dict) else auto_attn or AutoAttn()
        self.distill, self.lm_after = as_config(distill), lm_after
        if (self.align.steps > 0 or self.distill.needs_teacher or attn_layers == "auto") and not transfer:
            raise SurgeryError("align, distill and attn_layers: auto use the source as a teacher: they make no sense "
                               "for a model trained from scratch (transfer: []); drop them for the scratch arm")
        if transfer and attn_layers and "attn_layers" not in transfer:
            raise SurgeryError(f"attn_layers: {attn_layers} keeps softmax attention, but transfer {list(transfer)} does not "
                               "copy it: the kept layers would start from random weights. Add attn_layers to transfer")
        self.source_model = Teacher(src)  # the source, frozen; a Teacher is no nn.Module: neither trained nor saved
        self.ranking: list[tuple[int, float]] | None = None
        self.spike_monitor: torch.Tensor | None = None  # the next-token CE of the last step, for the guard
        self._build([] if attn_layers == "auto" else attn_layers)

    def _build(self, attn_layers: list[int] | None) -> None:
        """The hybrid with softmax attention kept at `attn_layers`, the transfer into it, what is frozen."""
        hp, src = self.hparams, self.source_model.model
        self.model = hybrid_model(hybrid_config_from(src.config, hp.mixer, hp.mixer_config, attn_layers))
        self.report = transfer_shared_weights(src, self.model, hp.transfer)
        self.transferred = self.report.parameter_names if hp.freeze else []
        self.unfrozen_at: int | None = None if self.transferred else 0
        self._set_transferred_trainable(self.unfrozen_at is not None)
        uses_teacher = self.align.steps > 0 or self.distill.needs_teacher
        teacher = self.source_model if uses_teacher else None
        self.aligner = AttentionAligner(teacher, self.model.mixer_layers(), self.align.loss) if self.align.steps else None
        self.distiller = Distiller(self.distill, teacher)

    def setup(self, stage: str) -> None:
        """With attn_layers: auto, rank the layers on the first blocks of the data module's training split (in
        file order, not the shuffled epoch order; the validation split stays unseen) and rebuild the
        hybrid with the costliest `auto_attn.keep` layers as attention (before the optimizer exists and before a
        checkpoint is restored: the ranking is deterministic, so a resumed run rebuilds the same model)."""
        if self.hparams.attn_layers != "auto" or self.ranking is not None:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "split"):
            raise SurgeryError("attn_layers: auto ranks layers on the data module's training split; use a "
                               "surgery.data data module, or list the layers to keep")
        from torch.utils.data import DataLoader

        loader = DataLoader(dm.split("train"), batch_size=dm.batch_size)
        batches = [b.to(self.device) for b, _ in zip(loader, range(self.auto_attn.batches))]
        a = self.auto_attn
        self.ranking = rank_layers(self.source_model.model, self.hparams.mixer, self.hparams.mixer_config, batches,
                                   list(self.hparams.transfer), a.steps, a.lr, a.seed, a.criterion)
        chosen = choose_layers(self.ranking, a.keep)
        what = "KL to the source with that layer alone replaced" if a.criterion == "kl" else "alignment error"
        print(f"xatl: attn_layers auto kept attention at {chosen} ({what}, costliest first: "
              + ", ".join(f"{i}: {e:.4f}" for i, e in self.ranking) + ")")
        self._build(chosen)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if self.distill.teacher_top_k is not None:
            if dm is None or not hasattr(dm, "split"):
                raise SurgeryError("distill.teacher_top_k caches the teacher on the data module's training split; use a "
                                   "surgery.data data module, or set teacher_top_k null")
            self.distiller.attach_cache(dm.split("train").tokens, dm.block_size)

    def stage(self, step: int) -> str:
        """"align", "distill" or "lm": what trains at optimizer step `step`."""
        if step < self.align.steps:
            return "align"
        if self.distill.needs_teacher and (self.lm_after is None or step < self.lm_after):
            return "distill"
        return "lm"

    def _set_transferred_trainable(self, on: bool) -> None:
        params = dict(self.model.named_parameters())
        for name in self.transferred:
            params[name].requires_grad_(on)

    def unfreeze(self, step: int) -> None:
        self.unfrozen_at = step
        self._set_transferred_trainable(True)

    def configure_callbacks(self):
        return [UnfreezeTransferred(self.unfreeze_schedule)] if self.transferred else []

    def configure_optimizers(self):
        hp, moved = self.hparams, set(self.transferred)
        groups = {(t, d): [] for t in (False, True) for d in (True, False)}
        for n, p in self.model.named_parameters():
            groups[(n in moved, decays(p))].append(p)
        order = [(t, d) for t in (False, True) for d in (True, False) if groups[(t, d)]]
        opt = torch.optim.AdamW([{"params": groups[k], "weight_decay": hp.weight_decay if k[1] else 0.0}
                                 for k in order], lr=hp.lr, betas=tuple(hp.betas), **adamw_kernel(self.device))
        total = int(self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches)
        sch = self.unfreeze_schedule

        def mixer_lr(s: int) -> float:
            return cosine_with_warmup(s, hp.warmup_steps, total, hp.min_lr_ratio)

        def transferred_lr(s: int) -> float:  # 0 while frozen, then its own warm-up
            if self.unfrozen_at is None or s < self.unfrozen_at:
                return 0.0
            ramp = min(1.0, (s - self.unfrozen_at + 1) / max(1, sch.warmup_steps))
            return sch.lr_ratio * ramp * cosine_with_warmup(s, 0, total, hp.min_lr_ratio)

        lambdas = [transferred_lr if k[0] and self.transferred else mixer_lr for k in order]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def step_losses(self, batch: torch.Tensor, distill: bool, teacher_out=None) -> dict[str, torch.Tensor]:
        """Forwards and losses of a "distill" (`distill` true) or "lm" step on batch (B, T), the part `compile`
        compiles: "loss" (with gradients), "monitor" (detached next-token CE) and, distilling, the detached terms
        "ce", "kl", "hidden" that it weights. `teacher_out`: cached targets, else the teacher runs inside."""
        if not distill:
            loss = self.lm_loss(batch)
            return {"loss": loss, "monitor": loss.detach()}
        out = self.distiller(self.model, batch, teacher_out)
        return {**out.parts, "loss": out.loss, "monitor": out.monitor}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """The stage's loss; `spike_monitor` (for the divergence guard) is the next-token CE in every stage,
        so its scale does not jump at a stage change."""
        stage = self.stage(self.global_step)
        if stage == "align":
            loss, per_layer = self.aligner(self.model, batch)
            with torch.no_grad():
                ce = lm_cross_entropy(self.model, batch)
            for i, v in per_layer.items():
                self.log(f"align/layer{i}", v)
            self.log("align/loss", loss, prog_bar=True)
        else:
            teacher_out = self.distiller.cached_teacher(batch) if stage == "distill" else None
            result = self.compiled(self.step_losses)(batch, stage == "distill", teacher_out)
            loss, ce = result.pop("loss"), result.pop("monitor")
            for k, v in result.items():
                self.log(f"distill/{k}", v, prog_bar=k == "kl")
        self.spike_monitor = ce.detach()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        self.log("xatl/frozen", float(self.unfrozen_at is None))
        self.log("xatl/stage", float(("align", "distill", "lm").index(stage)))
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["xatl_unfrozen_at"] = self.unfrozen_at

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = (checkpoint.get("hf_config") or {}).get("attn_layers")
        if saved is not None and list(saved) != list(self.model.config.attn_layers or []):
            raise SurgeryError(f"the checkpoint's model keeps attention at {saved}, this run's at "
                               f"{self.model.config.attn_layers}: resume with attn_layers: {saved}")
        self.unfrozen_at = checkpoint.get("xatl_unfrozen_at")
        self._set_transferred_trainable(self.unfrozen_at is not None)

    def run_metrics(self, exported=None, val=None) -> dict:
        """The run's XATL settings, and the source's own loss on the same validation split (and its token count)
        with the gap to it (`gap_vs_source` = this model's loss - the source's, nats/token). Called by ExportRun
        (with `val`), it prints the results table (`result_rows`) too."""
        source_val = None
        dm = self.trainer.datamodule if val is not None else None  # with `val`, called by ExportRun in a run
        if dm is not None and hasattr(dm, "split"):
            from surgery.eval.loss import cross_entropy

            src = self.source_model.model
            source_val = cross_entropy(src.to(self.device).eval(), dm.split("validation"), dm.batch_size)
        loss, tokens = (None, None) if source_val is None else (source_val["loss"], source_val["tokens"])
        gap = None if loss is None else val["loss"] - loss
        out = {"xatl": {"source_val_loss": loss, "gap_vs_source": gap, "source_val_tokens": tokens,
                        "mixer": self.hparams.mixer,
                        "transfer": list(self.hparams.transfer),
                        "transferred_params": self.report.num_params, "frozen_tensors": len(self.transferred),
                        "unfrozen_at": self.unfrozen_at, "align_steps": self.align.steps,
                        "distill": self.distill.describe(), "lm_after": self.lm_after,
                        "attn_layers": list(self.model.config.attn_layers or []),
                        "attn_layer_ranking": self.ranking,
                        "attn_layer_criterion": self.auto_attn.criterion if self.ranking is not None else None}}
        if val is not None:
            print_results("Cross-architecture transfer: results", result_rows({"val": val, **out}))
        return out
