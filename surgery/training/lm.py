"""The Lightning module that trains a Hugging Face causal LM: next-token loss, AdamW, warm-up + cosine."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from surgery.errors import SurgeryError
from surgery.models.loading import load_causal_lm
from surgery.models.loss import causal_lm_loss
from surgery.training.distill import lm_cross_entropy


def build_model(init: str | None, config: dict[str, Any] | None, tokenizer: Any = None) -> PreTrainedModel:
    """`init` names a pretrained model (Hub, directory, .ckpt); without it, a fresh model from `config`
    (its `model_type`, default gpt2, picks the Hugging Face config class; the other keys are that class's
    fields) whose vocabulary and end-of-text id are the tokenizer's."""
    vocab_size = len(tokenizer) if tokenizer is not None else None
    if init:
        model = load_causal_lm(init)
        model.train()  # from_pretrained returns eval mode, and Lightning 2.x keeps each submodule's mode
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            raise SurgeryError(
                f"the tokenizer has {vocab_size} entries but model {init!r} embeds only "
                f"{model.get_input_embeddings().num_embeddings}: set data.tokenizer to the model's own tokenizer"
            )
        return model
    special = {}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        special = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    fields = dict(config or {})
    model_type = fields.pop("model_type", "gpt2")
    try:
        cfg = AutoConfig.for_model(model_type, **{"vocab_size": vocab_size or 50257, **special, **fields})
    except ValueError as err:
        raise SurgeryError(f"model.config.model_type {model_type!r}: {err}") from None
    return causal_lm_loss(AutoModelForCausalLM.from_config(cfg))


def decays(p: torch.nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies: matrices, except those a module marks `_no_weight_decay` (the
    mamba-ssm convention, e.g. Mamba's A_log); never vectors (biases, norm gains, Mamba's D)."""
    return p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation for the parameters' device: the fused kernel on CUDA, the multi-tensor (foreach) one
    elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LMModule(L.LightningModule):
    """What every module that trains a causal LM shares: the next-token cross-entropy (nats/token), AdamW with
    warm-up + cosine, `hf_config` in every checkpoint, `export_model`. A subclass builds `self.model` in its
    `__init__` (after `super().__init__()` and `save_hyperparameters`) and has hyperparameters `lr`, `min_lr_ratio`,
    `warmup_steps`, `weight_decay` and `betas`."""

    def compiled(self, fn):
        """`fn` (a bound method of this module) through `torch.compile` when the hyperparameter `compile` is true,
        compiled once per method; else `fn` itself."""
        if not self.hparams.get("compile"):
            return fn
        cache = self.__dict__.setdefault("_compiled", {})
        if fn.__name__ not in cache:
            cache[fn.__name__] = torch.compile(fn)
        return cache[fn.__name__]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def lm_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats/token) on batch (B, T), without building the full logits."""
        return lm_cross_entropy(self.model, batch)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.compiled(self.lm_loss)(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.lm_loss(batch), prog_bar=True, batch_size=batch.shape[0], sync_dist=True)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test/loss", self.lm_loss(batch), batch_size=batch.shape[0], sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]  # every model the module trains
        decay = [p for p in params if decays(p)]
        no_decay = [p for p in params if not decays(p)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            **adamw_kernel(self.device),
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_with_warmup(s, hp.warmup_steps, int(total), hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hf_config"] = self.model.config.to_dict()

    def export_model(self) -> PreTrainedModel:
        """The model to save at the end of a run (surgeries override this to fold their changes in)."""
        return self.model


class CausalLM(LMModule):
    """Trains `model` on token blocks with the mean next-token cross-entropy (nats/token).

    Args:
        init: pretrained model to start from (Hub name, local directory or .ckpt); None trains from scratch.
        config: for a model trained from scratch, `model_type` (gpt2, gpt_neox, llama, ...) and that
            config class's fields (vocab size comes from the tokenizer).
        lr: peak learning rate. min_lr_ratio: final lr as a share of `lr`.
        warmup_steps: linear warm-up steps. weight_decay, betas: AdamW settings (no decay on biases,
            norms and embeddings' positions).
        compile: run the training step's forwards and losses through `torch.compile`.
        tokenizer: set by the CLI from the data module; saved beside the exported model.
    """

    def __init__(
        self,
        init: str | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 6e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.model = build_model(init, config, tokenizer)
