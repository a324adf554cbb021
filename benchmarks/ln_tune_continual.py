"""Continual learning with task-keyed norm sets vs sequential full fine-tuning, sequential shared LN-tuning, the
oracle and joint training: 3 seeds x 2 task orders (as listed, and reversed) per recipe.

    OMP_NUM_THREADS=1 python -m benchmarks.ln_tune_continual sentiment       # all-MiniLM-L6-v2, the VADER sources
    OMP_NUM_THREADS=1 python -m benchmarks.ln_tune_continual lm              # tiny GPT-2, Pythia, Llama; stdlib packages

Each seed and order is an ordinary `surgery continual` run directory under runs/ln_tune/continual-bench/ (resumable:
a finished method is not rerun). Prints one table per recipe (mean +- sd over the 3 seeds, per order) and writes
benchmarks/ln_tune_continual.json, .md (with machine and date) and benchmarks/ln_tune_continual_<recipe>.png (the
CL matrices of the first order, averaged over seeds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from statistics import mean, stdev

import torch

from surgery.ln_tune.continual.report import plot_matrices
from surgery.ln_tune.continual.run import load_config, run_sequence

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"sentiment": ["minilm-vader"], "lm": ["tiny-gpt2-stdlib", "tiny-pythia-stdlib", "tiny-llama-stdlib"]}
MEASURES = ("final", "forgetting", "selection", "entries_per_task", "inference_ratio")


def ms(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": mean(values), "sd": stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def bench_recipe(name: str, seeds: list[int], out: Path) -> dict:
    base = load_config(ROOT / "recipes" / "ln_tune" / "continual" / f"{name}.yaml")
    orders = [list(base.tasks), list(reversed(base.tasks))]
    record = {"recipe": f"recipes/ln_tune/continual/{name}.yaml", "seeds": seeds, "orders": orders, "by_order": []}
    for k, order in enumerate(orders):
        runs = [run_sequence(load_config(ROOT / record["recipe"], seed, order), out / name / f"order{k}-seed{seed}",
                             save_model=False) for seed in seeds]
        arms = {a: {m: ms([r["arms"][a].get(m) for r in runs]) for m in MEASURES} for a in runs[0]["arms"]}
        matrices = {a: [[mean(r["matrices"][a][i][j] for r in runs) if runs[0]["matrices"][a][i][j] is not None
                         else None for j in range(len(order))] for i in range(len(runs[0]["matrices"][a]))]
                    for a in runs[0]["matrices"]}
        record["by_order"].append({"order": order, "arms": arms, "mean_matrices": matrices})
        record["metric"] = runs[0]["metric"]
    return record


def cell(stat: dict | None, metric: str, pct: bool) -> str:
    if stat is None:
        return "-"
    scale = 100 if pct else 1
    digits = 1 if pct else 3
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['sd']:.{digits}f}"


def table(record: dict) -> str:
    acc = record["metric"] == "accuracy"
    unit = "accuracy, %" if acc else "loss, nats/token"
    head = ["arm"] + [f"final ({unit}), order {k + 1}" for k in range(2)] + [f"forgetting, order {k + 1}" for k in range(2)]
    head += ["key selection, % (order 1 / 2)", "entries / task", "inference time ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in record["by_order"][0]["arms"]:
        per = [o["arms"][arm] for o in record["by_order"]]
        ratio = ms([o["inference_ratio"]["mean"] for o in per if o["inference_ratio"]])
        row = [arm] + [cell(o["final"], record["metric"], acc) for o in per]
        row += [cell(o["forgetting"], record["metric"], acc) for o in per]
        sel = " / ".join(cell(o["selection"], "accuracy", True) for o in per) if per[0]["selection"] else "-"
        row += [sel, f"{per[0]['entries_per_task']['mean']:,.0f}",
                f"{ratio['mean']:.2f}" if ratio else "1"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ln_tune/continual-bench")
    parser.add_argument("--recipes", nargs="+", default=None, help="a subset of the setting's recipes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = ROOT / "benchmarks" / "ln_tune_continual.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.recipes or RECIPES[args.setting]:
        record = bench_recipe(name, args.seeds, Path(args.out))
        record["command"] = f"OMP_NUM_THREADS=1 python -m benchmarks.ln_tune_continual {args.setting}"
        record["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
        record["date"] = datetime.date.today().isoformat()
        results[name] = record
        first = record["by_order"][0]
        plot_matrices([{"method": a, "tasks": first["order"], "metric": record["metric"], "matrix": m}
                       for a, m in first["mean_matrices"].items()],
                      ROOT / "benchmarks" / f"ln_tune_continual_{name}.png",
                      f"{name}: {' -> '.join(first['order'])}, mean of seeds {args.seeds}")
        print(f"\n{name} (mean ± sd over seeds {args.seeds}; order 1 = {' -> '.join(first['order'])}, "
              f"order 2 reversed)\n{table(record)}")
        path.write_text(json.dumps(results, indent=1))
    md = ["# Continual learning with task-keyed norm sets", "",
          "Budgets are the recipes' (recipes/ln_tune/continual/): per task, MiniLM 20 steps of 16 sentences and 5 head "
          "steps, 48 test sentences; the tiny LMs 20 steps of 8 x 128 tokens, 16 validation blocks of 128 tokens. "
          "Mean ± sample sd over seeds; forgetting positive = worse. Each recipe is written when all its runs end.", ""]
    for name, record in results.items():
        md += [f"## {name}", "", f"`{record['command']}` — {record['machine']}, {record['date']}; seeds "
               f"{record['seeds']}; order 1 = {' → '.join(record['orders'][0])}, order 2 reversed.", "",
               table(record), "", f"![CL matrices](ln_tune_continual_{name}.png)", ""]
    path.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
