"""Scores of a model on a task's test batches: plain, and task-keyed (selected set, oracle set, selection accuracy).

A score is the setting's metric over all test examples (accuracy: share right; LM: nats/token), summed over batches
and divided once. The frozen model's queries of a test set never change during a sequence (its own norms never
train), so `QueryCache` computes them once per task.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from surgery.ln_tune.continual.keyed import KeyedNorms


class QueryCache:
    """Queries (B, d) of every test batch of each task, computed on first use."""

    def __init__(self, keyed: KeyedNorms, tasks):
        self.keyed, self.tasks, self.cache = keyed, tasks, {}

    def __call__(self, name: str, test: list) -> list[torch.Tensor]:
        if name not in self.cache:
            self.cache[name] = [self.keyed.query(**self.tasks.inputs(b)) for b in test]
        return self.cache[name]


@torch.no_grad()
def plain_score(model: nn.Module, tasks, test: list) -> float:
    model.eval()
    total = count = 0
    for batch in test:
        s, n = tasks.score(model(**tasks.inputs(batch)).logits, batch)
        total, count = total + s, count + n
    return total / count


@torch.no_grad()
def keyed_scores(keyed: KeyedNorms, tasks, name: str, test: list, queries: list[torch.Tensor]) -> dict:
    """{"selected": score with each example's selected set, "oracle": with the set of `name` (None if `name` has no
    set yet), "selection": share of examples whose key selects `name` (None likewise)}. Rows whose selection is right
    share the oracle's forward."""
    keyed.eval()
    known = name in keyed.sets.names
    sel_total = orc_total = count = right = examples = 0
    for batch, q in zip(test, queries):
        inputs = tasks.inputs(batch)
        chosen = keyed.sets.select(q)
        if known:
            truth = keyed.tasks_of(name, chosen.shape[0])
            oracle = keyed.run_with(truth, **inputs)
            wrong = (chosen != truth).nonzero().squeeze(1)
            selected = oracle
            if len(wrong):
                sub = {k: v.index_select(0, wrong) for k, v in inputs.items()}
                selected = oracle.index_copy(0, wrong, keyed.run_with(chosen[wrong], **sub))
            orc_total += tasks.score(oracle, batch)[0]
            right += int((chosen == truth).sum())
        else:
            selected = keyed.run_with(chosen, **inputs)
        s, n = tasks.score(selected, batch)
        sel_total, count, examples = sel_total + s, count + n, examples + chosen.shape[0]
    return {"selected": sel_total / count, "oracle": orc_total / count if known else None,
            "selection": right / examples if known else None}


@torch.no_grad()
def inference_cost(keyed: KeyedNorms, tasks, batches: list) -> dict:
    """Seconds per batch of the keyed model (pass 1 + selection + pass 2) and of one plain forward of the same model,
    on the same batches, and their ratio (the second forward's cost; these machines are shared, so only the ratio
    is meaningful)."""
    keyed.eval()

    def clock(fn) -> float:
        start = time.perf_counter()
        for batch in batches:
            fn(tasks.inputs(batch))
        return (time.perf_counter() - start) / len(batches)

    clock(lambda x: keyed.model(**x))  # warm-up
    plain = clock(lambda x: keyed.model(**x))
    two_pass = clock(lambda x: keyed(**x))
    return {"plain_s_per_batch": plain, "keyed_s_per_batch": two_pass, "ratio": two_pass / plain}
