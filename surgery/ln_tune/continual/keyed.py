"""`KeyedNorms`: a frozen model plus task-keyed norm sets, run in two forwards (De Min et al. 2023).

    keyed = KeyedNorms(model)                 # any model whose norms LN-tuning can select
    keyed.add_task("movies")                  # a new set (a copy of the newest, or of the model's own norms)
    logits = keyed(input_ids=..., attention_mask=...)   # pass 1: query -> nearest key; pass 2: that set
    keyed.save(out); KeyedNorms.load(out, AutoModelForSequenceClassification)

Pass 1 runs the model with its own (pretrained, never trained here) norms and pools its last hidden state into a
query (B, d): the mean over the positions the attention mask keeps. Pass 2 runs the model again, each row with the
norm set of its selected task, through `torch.func.functional_call` (the model's own tensors are not touched), one
call per task present in the batch. A task head (`classifier`, `score`) is shared by all tasks and lives in the model.

PEFT's `LNTuningConfig` could hold the sets (one adapter per task), but a PEFT model has one active adapter for the
whole batch, while selection here is per example; switching the active adapter per group of rows is the same split
as here with global state changed mid-forward. The sets are therefore plain tensors here; a test checks that a row
run with set t matches PEFT's LN-tuning adapter holding the same values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from surgery.errors import SurgeryError
from surgery.ln_tune.continual.sets import NormSets
from surgery.ln_tune.params import ln_parameters

SETS_FILE = "norm_sets.safetensors"


@torch.no_grad()
def query(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen model's output as a query (B, d): its last hidden state averaged over kept positions, in eval mode."""
    was = model.training
    model.eval()
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    model.train(was)
    hidden = out.hidden_states[-1].float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    keep = attention_mask[..., None].float()
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class KeyedNorms(nn.Module):
    """A model whose norms come from the set of each example's task. `model` keeps its pretrained norms (they make
    the query); `sets` are `NormSets.for_model(model)` unless given."""

    def __init__(self, model: nn.Module, sets: NormSets | None = None):
        super().__init__()
        self.model = model
        self.sets = sets if sets is not None else NormSets.for_model(model)

    def add_task(self, task: str, seed: int = 0) -> None:
        """A new set for `task`, starting from the newest set (from the model's own norms for the first task), with a
        key of N(0, 1) entries drawn with `seed`."""
        init = self.sets.set_values(self.sets.names[-1]) if len(self.sets) else ln_parameters(self.model)
        self.sets.add(task, init, generator=torch.Generator().manual_seed(seed))

    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return query(self.model, input_ids, attention_mask)

    def select(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Task index (B,) of each example: pass 1."""
        return self.sets.select(self.query(input_ids, attention_mask))

    def tasks_of(self, names: str | list[str], batch: int) -> torch.Tensor:
        """Task indices (batch,) from one task name for every row or a name per row."""
        names = [names] * batch if isinstance(names, str) else list(names)
        if len(names) != batch:
            raise SurgeryError(f"{len(names)} task names for {batch} examples: give one name, or one per example")
        return torch.tensor([self.sets.index(n) for n in names], dtype=torch.long)

    def run_with(self, tasks: torch.Tensor, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
        """Pass 2: the model's logits (B, ...) with row b run under the set of task index `tasks[b]`. Gradients reach
        the sets (and any trainable model parameter); rows are grouped by task, one forward per group."""
        if not len(self.sets):
            raise SurgeryError("this model has no norm sets to run with: train a task first (KeyedNorms.add_task) or "
                               "load saved sets (KeyedNorms.load)")
        out = None
        for t in torch.unique(tasks).tolist():
            rows = (tasks == t).nonzero().squeeze(1).to(input_ids.device)
            sub = {k: v.index_select(0, rows) if torch.is_tensor(v) else v for k, v in inputs.items()}
            logits = functional_call(self.model, self.sets.set_values(self.sets.names[t]),
                                     args=(), kwargs={"input_ids": input_ids.index_select(0, rows), **sub}).logits
            if out is None:
                out = logits.new_zeros((input_ids.shape[0], *logits.shape[1:]))
            out = out.index_copy(0, rows, logits)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                task: str | list[str] | None = None) -> torch.Tensor:
        """Logits with each example's selected set (pass 1 then pass 2); `task` names the set instead (an oracle)."""
        tasks = (self.select(input_ids, attention_mask) if task is None else self.tasks_of(task, input_ids.shape[0]))
        inputs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.run_with(tasks, input_ids, **inputs)

    def save(self, directory: str | Path) -> None:
        """The model (`save_pretrained`) and its sets (`norm_sets.safetensors`) into one directory."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.sets.save(directory / SETS_FILE)

    @classmethod
    def load(cls, directory: str | Path, model_class) -> KeyedNorms:
        """A saved keyed model: `model_class.from_pretrained(directory)` plus its sets."""
        directory = Path(directory)
        if not (directory / SETS_FILE).is_file():
            raise SurgeryError(f"{directory} holds no {SETS_FILE}: it is not a model saved with norm sets "
                               "(KeyedNorms.save); load it as a plain model instead")
        model = model_class.from_pretrained(directory)
        return cls(model, NormSets.load(directory / SETS_FILE, model))
