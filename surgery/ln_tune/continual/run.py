"""One continual-learning run: every method of a config on one seed and task order, into one run directory.

    <out>/<method>.json   one method's result (CL matrices, times); a method whose file exists is not rerun
    <out>/keyed_model/    the task-keyed model with its norm sets (`KeyedNorms.save`), when `save_model`
    <out>/metrics.json    the config and, per arm, final score, forgetting, key selection, entries per task, cost
    <out>/cl_matrix.png   the CL matrix of every method (and the oracle)
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from surgery.errors import SurgeryError
from surgery.ln_tune.continual.report import plot_matrices, print_table, summary
from surgery.ln_tune.continual.sequence import ContinualConfig, run_method, set_seed


def load_config(path: str | Path, seed: int | None = None, order: list[str] | None = None) -> ContinualConfig:
    """A recipe's config; `seed` and `order` (the same tasks, reordered) override it."""
    if not Path(path).is_file():
        raise SurgeryError(f"no recipe at {path}: give a file such as recipes/ln_tune/continual/minilm-vader.yaml")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in fields(ContinualConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SurgeryError(f"{path}: unknown key(s) {unknown}; a continual recipe has {sorted(known)}")
    config = ContinualConfig(**raw)
    if seed is not None:
        config.seed = seed
    if order is not None:
        if sorted(order) != sorted(config.tasks):
            raise SurgeryError(f"--order {','.join(order)} must list the recipe's tasks {config.tasks} in some order")
        config.tasks = list(order)
    return config


def run_sequence(config: ContinualConfig, out: str | Path, save_model: bool = True) -> dict:
    """Runs (or resumes) every method of `config` into `out`; returns and writes metrics.json's content."""
    tasks = config.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for method in config.methods:
        path = out / f"{method}.json"
        if path.exists():
            result = json.loads(path.read_text())
            if result.get("config") == asdict(config):
                results.append(result)
                continue
        set_seed(config.seed)
        result = run_method(config, method)
        keyed = result.pop("keyed", None)
        if keyed is not None and save_model:
            keyed.save(out / "keyed_model")
        result["config"] = asdict(config)
        path.write_text(json.dumps(result, indent=1))
        results.append(result)
    arms = {}
    for r in results:
        arms |= summary(r, tasks.higher_is_better)
    metrics = {"config": asdict(config), "metric": tasks.metric, "higher_is_better": tasks.higher_is_better,
               "arms": arms, "matrices": {r["method"]: r["matrix"] for r in results}}
    keyed = next((r for r in results if r["method"] == "keyed"), None)
    if keyed:
        metrics["matrices"]["oracle"] = keyed["oracle_matrix"]
        metrics["selection_matrix"] = keyed["selection_matrix"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    title = f"continual {config.setting}: {' -> '.join(config.tasks)} (seed {config.seed})"
    plot_matrices(results, out / "cl_matrix.png", title)
    print_table(title, arms, tasks.metric)
    return metrics
