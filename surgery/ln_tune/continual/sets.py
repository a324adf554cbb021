"""`NormSets`: one set of norm gains and biases per task, each with a key, stored beside a frozen model.

The parameters a set holds are LN-tuning's selection (`surgery.ln_tune.params.ln_parameters`: every norm the
model's family describes; an RMSNorm contributes its gain only), so a set has exactly the shapes of the model's own
norm parameters and can stand in for them in a forward (`surgery.ln_tune.continual.keyed`).

A key is a vector of the frozen model's hidden width (d,). Selection compares a query (B, d) (the frozen model's
pooled output) with every key by cosine similarity and picks the highest: `select` returns task indices (B,).

Saved as one safetensors file: tensor `<task>/<parameter name>` for every entry of a set and `<task>/key` for its
key; the metadata records the task order and the parameter names, so a reload into another model is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgery.errors import SurgeryError
from surgery.ln_tune.params import ln_parameters

TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")


class NormSets(nn.Module):
    """Task-keyed norm sets of one model.

    Args:
        param_names: full names of the norm parameters a set replaces (e.g. `transformer.h.0.ln_1.weight`).
        shapes: their shapes, in the same order.
        key_dim: the width d of a key (the frozen model's hidden size).
    """

    def __init__(self, param_names: list[str], shapes: list[tuple[int, ...]], key_dim: int):
        super().__init__()
        self.param_names, self.shapes, self.key_dim = list(param_names), [tuple(s) for s in shapes], key_dim
        self.values = nn.ModuleDict()  # task -> ParameterList in `param_names` order
        self.keys = nn.ParameterDict()  # task -> (key_dim,)

    @classmethod
    def for_model(cls, model: nn.Module) -> NormSets:
        """Empty sets for `model`'s norms, with keys as wide as its hidden states (`config.hidden_size`)."""
        params = ln_parameters(model)
        return cls(list(params), [tuple(p.shape) for p in params.values()], int(model.config.hidden_size))

    @property
    def names(self) -> list[str]:
        """Task names in the order they were added."""
        return list(self.values.keys())

    def __len__(self) -> int:
        return len(self.values)

    def index(self, task: str) -> int:
        if task not in self.values:
            raise SurgeryError(f"no norm set named {task!r}; the sets are {self.names or 'none yet'}: "
                               "use one of them, or add it with NormSets.add")
        return self.names.index(task)

    def add(self, task: str, init: dict[str, torch.Tensor], key: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> None:
        """A new set `task` starting from `init` (parameter name -> tensor; copied), and a key (random
        N(0, 1) entries drawn from `generator` unless given). Refuses a name in use or not `[A-Za-z0-9_-]+`."""
        if not TASK_NAME.fullmatch(task):
            raise SurgeryError(f"task name {task!r} may hold only letters, digits, '_' and '-'; rename the task")
        if task in self.values:
            raise SurgeryError(f"a norm set named {task!r} already exists; give the new task another name")
        missing = [n for n in self.param_names if n not in init]
        if missing:
            raise SurgeryError(f"the initial values lack {len(missing)} norm parameters, e.g. {missing[0]!r}: "
                               "start a set from ln_parameters(model) or from another set")
        self.values[task] = nn.ParameterList([nn.Parameter(init[n].detach().clone()) for n in self.param_names])
        if key is None:
            key = torch.randn(self.key_dim, generator=generator)
        self.keys[task] = nn.Parameter(key.detach().clone().float())

    def set_values(self, task: str) -> dict[str, nn.Parameter]:
        """The set `task` as parameter name -> tensor, ready for `torch.func.functional_call`."""
        self.index(task)
        return dict(zip(self.param_names, self.values[task]))

    def entries_per_task(self) -> int:
        """Numbers one task adds: its norm entries plus its key."""
        return sum(torch.Size(s).numel() for s in self.shapes) + self.key_dim

    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, n_tasks) of queries (B, d) with every key, in task order."""
        if not len(self):
            raise SurgeryError("this model has no norm sets to select from: train at least one task first "
                               "(surgery.ln_tune.continual.keyed.KeyedNorms.add_task) or load saved sets")
        keys = torch.stack([self.keys[t] for t in self.names])
        return nn.functional.cosine_similarity(queries.float()[:, None, :], keys[None], dim=-1)

    def select(self, queries: torch.Tensor) -> torch.Tensor:
        """Task index (B,) of the key closest in cosine to each query (B, d)."""
        return self.similarity(queries).argmax(dim=-1)

    def save(self, path: str | Path) -> None:
        tensors = {}
        for task in self.names:
            for name, value in self.set_values(task).items():
                tensors[f"{task}/{name}"] = value.detach().contiguous()
            tensors[f"{task}/key"] = self.keys[task].detach().contiguous()
        meta = {"tasks": json.dumps(self.names), "param_names": json.dumps(self.param_names),
                "key_dim": str(self.key_dim)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> NormSets:
        """Sets saved by `save`, checked against `model`'s norm parameters (names and shapes)."""
        from safetensors import safe_open

        if not Path(path).is_file():
            raise SurgeryError(f"no norm sets at {path}: save them with NormSets.save (KeyedNorms.save writes "
                               "norm_sets.safetensors beside the model)")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        sets = cls.for_model(model)
        if json.loads(meta["param_names"]) != sets.param_names:
            raise SurgeryError(f"the norm sets in {path} were saved for other norm parameters than this model's "
                               "(another architecture or family): load them into the model they were trained with")
        tensors = load_file(str(path))
        for task in json.loads(meta["tasks"]):
            sets.add(task, {n: tensors[f"{task}/{n}"] for n in sets.param_names}, key=tensors[f"{task}/key"])
        return sets
