"""Run a task sequence with one method and record the continual-learning matrix.

Methods (each from a freshly loaded model, on the same data, order and steps per task):
    keyed       task-keyed norm sets (De Min et al. 2023): per task, a key is fitted to the frozen model's queries of
                the task's training data, stage 1 trains a new norm set (started from the
                newest one) and its key, plus the head where there is one, with the task known; stage 2 (classifiers
                only) trains the head with each example's *selected* set, as at inference. Its matrix also gives
                the oracle (the right set, told the task) and key-selection accuracy.
    full        sequential full fine-tuning (every parameter).
    ln-shared   sequential LN-tuning with one shared set (norm gains and biases, plus the head).
    joint       full fine-tuning on all tasks at once (batches of the tasks in turn; as many steps as the whole
                sequence): the upper bound; one row only.

`matrix[i][j]` is the score on task j after training on the i-th task of the order (the usual CL matrix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from surgery.errors import SurgeryError
from surgery.ln_tune.continual.evaluate import QueryCache, inference_cost, keyed_scores, plain_score
from surgery.ln_tune.continual.keyed import KeyedNorms
from surgery.ln_tune.continual.stages import key_loss, norm_set_loss, plain_loss, selected_loss, train_stage
from surgery.ln_tune.continual.tasks import SETTINGS
from surgery.ln_tune.params import head_parameters, ln_parameters

METHODS = ("keyed", "full", "ln-shared", "joint")


@dataclass
class ContinualConfig:
    """setting: "sentiment" or "lm". tasks: the sequence, in order (two or more). data: the setting's arguments
    (`SentimentTasks`, `LMTasks`). steps: optimizer steps per task and stage. head_steps: stage-2 steps (classifiers).
    ln_lr: lr of norm sets and the LN baseline's norms (LN-tuning wants 1e-3..1e-2). full_lr: lr of full
    fine-tuning. head_lr: lr of the head wherever only norms and the head train (stages 1 and 2, ln-shared). key_steps, key_lr: steps and lr fitting each key to the queries
    of the first key_batches training batches of its task (batches of 64 queries).
    seed: model head, data subsets, order of batches and initial keys."""

    setting: str
    tasks: list[str]
    data: dict = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 25
    head_steps: int = 10
    ln_lr: float = 5e-3
    full_lr: float = 5e-5
    head_lr: float = 1e-3
    key_steps: int = 200
    key_lr: float = 0.05
    key_batches: int = 8
    seed: int = 0

    def check(self):
        if self.setting not in SETTINGS:
            raise SurgeryError(f"unknown setting {self.setting!r}; choose {' or '.join(SETTINGS)}")
        if len(self.tasks) < 2:
            raise SurgeryError(f"a continual sequence needs at least two tasks, got {list(self.tasks)}: list two or "
                               "more under tasks (one task is ordinary LN-tuning: surgery fit with an ln_tune recipe)")
        if len(set(self.tasks)) != len(self.tasks):
            raise SurgeryError(f"the task sequence {list(self.tasks)} names a task twice: list each task once")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SurgeryError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        tasks = SETTINGS[self.setting](**self.data)
        tasks.check(list(self.tasks))
        return tasks


class RoundRobin:
    """Batches of several loaders in turn (joint training), as many as all of them hold."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __len__(self) -> int:
        return sum(len(x) for x in self.loaders)

    def __iter__(self):
        its = [iter(x) for x in self.loaders]
        while its:
            for it in list(its):
                try:
                    yield next(it)
                except StopIteration:
                    its.remove(it)


def run_method(config: ContinualConfig, method: str) -> dict:
    """{"method", "tasks", "matrix", "train_s", ...}; for keyed also "oracle_matrix", "selection_matrix",
    "entries_per_task", "inference"."""
    tasks = config.check()
    data = {name: tasks.task(name, config.seed) for name in config.tasks}
    model = tasks.load_model(config.seed)
    heads = list(head_parameters(model).values())
    start = time.perf_counter()
    out: dict = {"method": method, "tasks": list(config.tasks), "metric": tasks.metric, "matrix": []}
    if method == "joint":
        steps = config.steps * len(config.tasks)
        train_stage(model, plain_loss(model, tasks), [(list(model.parameters()), config.full_lr)],
                    RoundRobin([d.train for d in data.values()]), steps)
        out["matrix"].append([plain_score(model, tasks, d.test) for d in data.values()])
        out["train_s"] = time.perf_counter() - start
        return out
    keyed = KeyedNorms(model) if method == "keyed" else None
    cache = QueryCache(keyed, tasks) if keyed else None
    if keyed:
        out |= {"oracle_matrix": [], "selection_matrix": []}
    for i, name in enumerate(config.tasks):
        train = data[name].train
        if keyed:
            keyed.add_task(name, seed=config.seed * 100 + i)
            queries = torch.cat([keyed.query(**tasks.inputs(b)) for b in limited(train, config.key_batches)])
            train_stage(keyed, key_loss(keyed, name), [([keyed.sets.keys[name]], config.key_lr)],
                        DataLoader(queries, batch_size=64, shuffle=True), config.key_steps)
            train_stage(keyed, norm_set_loss(keyed, tasks, name),
                        [(list(keyed.sets.values[name]), config.ln_lr), (heads, config.head_lr)], train, config.steps)
            if heads and config.head_steps:
                train_stage(keyed, selected_loss(keyed, tasks), [(heads, config.head_lr)], train, config.head_steps)
            rows = [keyed_scores(keyed, tasks, n, d.test, cache(n, d.test)) for n, d in data.items()]
            out["matrix"].append([r["selected"] for r in rows])
            out["oracle_matrix"].append([r["oracle"] for r in rows])
            out["selection_matrix"].append([r["selection"] for r in rows])
        else:
            groups = ([(list(model.parameters()), config.full_lr)] if method == "full"
                      else [(list(ln_parameters(model).values()), config.ln_lr), (heads, config.head_lr)])
            train_stage(model, plain_loss(model, tasks), groups, train, config.steps)
            out["matrix"].append([plain_score(model, tasks, d.test) for d in data.values()])
    out["train_s"] = time.perf_counter() - start
    if keyed:
        out["entries_per_task"] = keyed.sets.entries_per_task()
        out["inference"] = inference_cost(keyed, tasks, [b for d in data.values() for b in d.test[:4]])
        out["keyed"] = keyed
    return out


def limited(loader, batches: int) -> list:
    """The first `batches` batches of one pass over `loader`."""
    out = []
    for batch in loader:
        if len(out) == batches:
            break
        out.append(batch)
    return out


def set_seed(seed: int) -> None:
    import lightning as L

    L.seed_everything(seed, verbose=False)
    torch.manual_seed(seed)
