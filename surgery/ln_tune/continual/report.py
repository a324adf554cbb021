"""Continual-learning measures from a CL matrix, the end-of-run table and the matrix plot.

With `matrix[i][j]` the score on task j after the i-th task of the sequence (T tasks):
    final       mean over j of `matrix[T-1][j]`: average final accuracy (LM: average final loss, nats/token)
    forgetting  mean over j < T-1 of (best score on j before the last task - final score on j), oriented so that
                positive means worse now (accuracy: points lost; LM: nats/token gained); the usual definition
                (Chaudhry et al. 2018) with "best" = max accuracy or min loss
    selection   keyed only: share of the final stage's test examples whose key selects their own task
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from surgery.training.report import num, print_results


def final(matrix: list[list[float]]) -> float:
    return mean(matrix[-1])


def forgetting(matrix: list[list[float]], higher_is_better: bool) -> float | None:
    """Mean loss of score on the earlier tasks after the last one (positive: forgot); None for a single row."""
    if len(matrix) < 2:
        return None
    drops = []
    for j in range(len(matrix) - 1):
        earlier = [matrix[i][j] for i in range(j, len(matrix) - 1)]
        best = max(earlier) if higher_is_better else min(earlier)
        drops.append(best - matrix[-1][j] if higher_is_better else matrix[-1][j] - best)
    return mean(drops)


def summary(result: dict, higher_is_better: bool) -> dict[str, dict]:
    """{arm: {"final", "forgetting", "selection", "entries_per_task", "inference_ratio", "train_s"}}; the keyed method
    gives two arms, `keyed` and `oracle` (same sets, told the task). `train_s`: wall seconds of the whole method,
    training and the evaluations after each task."""
    m = result["method"]
    arm = {"final": final(result["matrix"]), "forgetting": forgetting(result["matrix"], higher_is_better),
           "train_s": result["train_s"], "entries_per_task": result.get("entries_per_task", 0),
           "forwards": 2 if m == "keyed" else 1}
    if m != "keyed":
        return {m: arm}
    arm["selection"] = mean(result["selection_matrix"][-1])
    arm["inference_ratio"] = result["inference"]["ratio"]
    oracle = {"final": final(result["oracle_matrix"]), "forgetting": forgetting(result["oracle_matrix"], higher_is_better),
              "entries_per_task": arm["entries_per_task"], "forwards": 1}
    return {"keyed": arm, "oracle": oracle}


def fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if metric == "accuracy" else f"{value:.3f}"


def print_table(title: str, arms: dict[str, dict], metric: str) -> None:
    unit = "accuracy, %" if metric == "accuracy" else "loss, nats/token"
    rows = []
    for name, a in arms.items():
        sel = f", key selection {100 * a['selection']:.1f}%" if a.get("selection") is not None else ""
        cost = f", x{a['inference_ratio']:.2f} time" if a.get("inference_ratio") else ""
        rows.append((f"{name}: final / forgetting ({unit})",
                     f"{fmt(a['final'], metric)} / {fmt(a['forgetting'], metric)}{sel}; "
                     f"+{num(a['entries_per_task'])} per task, {a['forwards']} forward(s){cost}"))
    print_results(title, rows)


def plot_matrices(results: list[dict], path: Path, title: str = "") -> None:
    """One heat map per method (and the oracle): rows = after task i, columns = score on task j; one colour scale
    for all panels (accuracy: 0 to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for r in results:
        panels.append((r["method"], r["matrix"]))
        if "oracle_matrix" in r:
            panels.append(("oracle", r["oracle_matrix"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    names = results[0]["tasks"]
    accuracy = results[0]["metric"] == "accuracy"
    values = [v for _, m in panels for row in m for v in row if v is not None]
    low, high = (0.0, 1.0) if accuracy else (min(values), max(values))
    for ax, (method, matrix) in zip(axes[0], panels):
        data = [[float("nan") if v is None else v for v in row] for row in matrix]
        ax.imshow(data, cmap="viridis" if accuracy else "viridis_r", aspect="auto", vmin=low, vmax=high)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, fmt(v, results[0]["metric"]), ha="center", va="center", fontsize=7, color="w")
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
        ax.set_yticks(range(len(matrix)), ["all tasks"] if len(matrix) == 1 else names, fontsize=7)
        ax.set_xlabel(f"{results[0]['metric']} on task")
    axes[0][0].set_ylabel("after training on")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
