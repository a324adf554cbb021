"""Standard benchmarks through lm-evaluation-harness (the `lm-eval` package) on a loaded causal LM, hybrids included.

lm-eval does the evaluation: it builds each task's prompts, scores them with its `HFLM` wrapper around our model
and tokenizer (log-likelihoods of each choice given the context, for multiple-choice tasks), and aggregates
metrics with their standard errors. This module finds the tasks (lm-eval's built-in ones such as hellaswag or piqa,
whose datasets come from the Hugging Face Hub; task YAMLs in `include_paths`; `stdlib_next_line`, built offline
by `surgery.eval.tasks` when no folder provides it) and turns lm-eval's results into
{task: {metric: {"value", "stderr"}}}. `lm_eval` is imported only here, and only when tasks are asked for.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from surgery.errors import SurgeryError

# lm-eval warns on every run that a model passed as an object ignores its other loading arguments: we pass none.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`",)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED)


def import_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise SurgeryError(f"--tasks runs lm-evaluation-harness, which is not installed ({err}): pip install "
                           "'lm-surgery[eval]' (or 'lm-eval[hf]')") from err
    return lm_eval


def check_include_paths(paths: list[str]) -> list[Path]:
    """The folders as absolute paths; each must exist and be a folder (lm-eval scans it for task YAMLs)."""
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise SurgeryError(f"--include-path {p}: no such folder; pass a folder of lm-eval task YAMLs (for example "
                               "one written by surgery.eval.tasks.stdlib_next_line)")
        if not path.is_dir():
            raise SurgeryError(f"--include-path {p}: not a folder; pass the folder that holds the task YAML, not the file")
        out.append(path.resolve())
    return out


def task_manager(names: list[str], include_paths: list[Path]):
    """An lm-eval `TaskManager` that knows every name in `names`, else a SurgeryError listing close names.

    The built-in index (thousands of YAMLs, tens of seconds to scan) is read only when the include paths do not
    hold every task; `stdlib_next_line` missing from them is written under the surgery cache first.
    """
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    from surgery.eval.tasks import TASK, stdlib_next_line
    from surgery.models.paths import cache_dir

    def local(paths):
        return TaskManager(include_path=[str(p) for p in paths], include_defaults=False) if paths else None

    manager = local(include_paths)
    known = set(manager.all_tasks) if manager else set()
    if TASK in names and TASK not in known:
        include_paths = [*include_paths, stdlib_next_line(cache_dir() / "lm_eval_tasks").parent]
        manager = local(include_paths)
        known = set(manager.all_tasks)
    if all(n in known for n in names):
        return manager
    # Our offline task and the include paths' tasks come first: a name close to one of them is a typo of it, told at
    # once when every unknown name is, without the tens of seconds the built-in index takes.
    ours = sorted(known | {TASK})
    near = {n: difflib.get_close_matches(n, ours, n=4, cutoff=0.8) for n in names if n not in known}
    if all(near.values()):
        raise unknown_tasks(list(near), near)
    manager = TaskManager(include_path=[str(p) for p in include_paths] or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise unknown_tasks(unknown, {n: near.get(n) or difflib.get_close_matches(n, manager.all_tasks, n=4, cutoff=0.6)
                                      for n in unknown})
    return manager


def unknown_tasks(unknown: list[str], close: dict[str, list[str]]) -> SurgeryError:
    """The error for task names lm-eval does not know, with the close names found for each."""
    hints = "; ".join(f"{n!r}: did you mean {', '.join(close[n])}?" if close.get(n) else f"{n!r}: no close name"
                      for n in unknown)
    return SurgeryError(f"--tasks: lm-eval knows no task {', '.join(map(repr, unknown))} ({hints}). Built-in tasks "
                        "are listed by `lm-eval ls tasks`; a local task YAML needs --include-path FOLDER")


def run_tasks(model, tokenizer, names: list[str], include_paths: list[str] = (), batch_size: int = 16,
              limit: int | None = None, num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` on `model` (any `transformers` causal LM, evaluated where its weights are).

    Returns {"version", "tasks": {task: {metric: {"value", "stderr"}}}, "n_samples": {task: docs evaluated},
    "num_fewshot": {task: n}, "limit"}, plus "samples" (lm-eval's per-doc records) when `log_samples`.
    Metrics are lm-eval's (for multiple choice, `acc` and `acc_norm`: fractions of docs in [0, 1]).
    """
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").addFilter(_DropExpected())
    logging.getLogger("lm_eval.models.huggingface").addFilter(_DropExpected())
    manager = task_manager(names, check_include_paths(list(include_paths)))
    try:
        manager.load(names)  # datasets are fetched here: fail with one line, not lm-eval's traceback
    except (OSError, ConnectionError, ValueError) as err:
        raise SurgeryError(f"--tasks {','.join(names)}: could not load a task's dataset ({type(err).__name__}: {err}). "
                           "Built-in tasks download theirs from the Hugging Face Hub; offline, use a local task such as "
                           "stdlib_next_line") from err
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=log_samples)
    result = {"version": getattr(lm_eval, "__version__", "unknown"), "tasks": metrics(out["results"]),
              "n_samples": {t: n["effective"] for t, n in out.get("n-samples", {}).items()},
              "num_fewshot": out.get("n-shot", {}), "limit": limit}
    if log_samples:
        result["samples"] = out["samples"]
    return result


def metrics(results: dict) -> dict:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": s, ...}} as {task: {metric: {"value", "stderr"}}};
    a filter other than "none" is kept in the metric's name ("exact_match (strict-match)"); stderr None when absent."""
    out = {}
    for task, values in results.items():
        rows = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            rows[name] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        out[task] = rows
    return out
