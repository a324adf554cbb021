"""The training stages, each one Lightning fit over a task's loader for a fixed number of optimizer steps.

`train_stage(net, loss_fn, groups, loader, steps)` freezes every parameter of `net`, unfreezes those of `groups`
(a list of (parameters, lr): a new 2-way head needs a smaller lr than norm entries, or Adam's first steps flip its
prediction from one class to the other), and minimises `loss_fn(batch)` with AdamW (no weight decay, so nothing
outside the groups moves) under a linear warm-up (10% of the steps) and linear decay to 0. The loss functions of the methods:

- `key_loss` (task-keyed, before stage 1, as the reference code's split training): 1 - cos(query, key of the task)
  over the frozen model's queries of the task's training data (computed once), which pulls the key toward them.
- `norm_set_loss` (task-keyed stage 1): the task loss with the current task's set (the task is known in training).
- `selected_loss` (task-keyed stage 2): the task loss with each example's *selected* set, as at inference; only the
  head trains.
- `plain_loss` (the baselines): the task loss of the model itself.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from surgery.ln_tune.classify import linear_warmup_decay
from surgery.ln_tune.continual.keyed import KeyedNorms


class Stage(L.LightningModule):
    """Minimise `loss_fn(batch)` over `groups` [(parameters of `net`, lr)]; AdamW, warm-up then linear decay to 0."""

    def __init__(self, net: nn.Module, loss_fn: Callable, groups: list[tuple[list[nn.Parameter], float]], steps: int):
        super().__init__()
        self.net, self.loss_fn, self.groups, self.steps = net, loss_fn, groups, steps

    def training_step(self, batch, batch_idx):
        loss = self.loss_fn(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in self.groups if p], weight_decay=0.0)
        warmup = max(1, self.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup_decay(s, warmup, self.steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_stage(net: nn.Module, loss_fn: Callable, groups: list[tuple[list[nn.Parameter], float]], loader,
                steps: int) -> None:
    """One stage of `steps` optimizer steps; only the groups' parameters have `requires_grad` during it (and after)."""
    for p in net.parameters():
        p.requires_grad_(False)
    for params, _ in groups:
        for p in params:
            p.requires_grad_(True)
    net.train()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(Stage(net, loss_fn, groups, steps), train_dataloaders=loader)
    net.eval()


def key_loss(keyed: KeyedNorms, task: str) -> Callable:
    """On a batch of cached queries (B, d): 1 - mean cos(query, key of `task`)."""
    def loss(queries):
        key = keyed.sets.keys[task]
        return 1.0 - nn.functional.cosine_similarity(queries, key[None].expand_as(queries), dim=-1).mean()

    return loss


def norm_set_loss(keyed: KeyedNorms, tasks, task: str) -> Callable:
    def loss(batch):
        inputs = tasks.inputs(batch)
        return tasks.loss(keyed.run_with(keyed.tasks_of(task, inputs["input_ids"].shape[0]), **inputs), batch)

    return loss


def selected_loss(keyed: KeyedNorms, tasks) -> Callable:
    def loss(batch):
        inputs = tasks.inputs(batch)
        with torch.no_grad():
            index = keyed.select(**inputs)
        return tasks.loss(keyed.run_with(index, **inputs), batch)

    return loss


def plain_loss(model: nn.Module, tasks) -> Callable:
    return lambda batch: tasks.loss(model(**tasks.inputs(batch)).logits, batch)
