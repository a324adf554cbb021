"""What LayerNorm gives attention (Brody et al. 2023), for LN-free exports against their originals, over seeds.

    python -m benchmarks.ln_free_expressivity gpt2=VERIFY_DIR gpt2=VERIFY_DIR ... --out benchmarks/ln_free_expressivity

Each VERIFY_DIR holds the report.json of `surgery verify EXPORT --baseline ORIGINAL --out VERIFY_DIR` (one per seed of
a family). For each family and row, the mean over layers of the model (LN-free) and of the baseline (with LN), and
their difference, each as mean ± sample sd over the seeds given; per-layer means go to the JSON. Writes <out>.json
and <out>.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

MODEL, BASELINE = "model (LN-free)", "baseline (with LN)"
ROWS = {  # name -> path into report.json's expressivity section
    "unselectable key share": ("unselectable_keys", "per_layer"),
    "all-ones component, block input": ("all_ones_component", "block_input"),
    "all-ones component, attention input": ("all_ones_component", "attention_input"),
    "attention entropy / uniform": ("attention_entropy", "per_layer"),
}


def per_layer(result: dict, path: tuple[str, str]) -> list[float]:
    section, key = path
    return [float(v) for v in result["expressivity"][section][key]]


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(reports: dict[str, list[dict]]) -> dict:
    out = {}
    for family, runs in reports.items():
        rows = {}
        for name, path in ROWS.items():
            model = [per_layer(r["results"][MODEL], path) for r in runs]
            base = [per_layer(r["results"][BASELINE], path) for r in runs]
            mean = lambda xs: statistics.mean(xs)  # noqa: E731
            rows[name] = {
                "model": spread([mean(m) for m in model]), "baseline": spread([mean(b) for b in base]),
                "difference": spread([mean(m) - mean(b) for m, b in zip(model, base)]),
                "model_per_layer": [statistics.mean(col) for col in zip(*model)],
                "baseline_per_layer": [statistics.mean(col) for col in zip(*base)],
            }
        first = runs[0]["results"][MODEL]["expressivity"]["unselectable_keys"]
        out[family] = {"seeds": len(runs), "keys_per_sequence": first["keys_per_sequence"], "d_head": first["d_head"],
                       "undecided_lps": sum(r["results"][k]["expressivity"]["unselectable_keys"].get("undecided", 0)
                                            for r in runs for k in (MODEL, BASELINE)),
                       "rows": rows}
    return out


def fmt(pair: tuple[float, float]) -> str:
    m, s = pair
    return f"{m:.2e} ± {s:.1e}" if abs(m) < 1e-3 and m != 0 else f"{m:.4f} ± {s:.4f}"


def table(summary: dict) -> str:
    lines = ["| family | seeds | row (mean over layers) | LN-free | original (with LN) | LN-free − original |",
             "|---|---|---|---:|---:|---:|"]
    for family, s in summary.items():
        for name, r in s["rows"].items():
            lines.append(f"| {family} | {s['seeds']} | {name} | {fmt(r['model'])} | {fmt(r['baseline'])} | "
                         f"{fmt(r['difference'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="FAMILY=VERIFY_DIR, one per seed")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ln_free_expressivity"))
    args = parser.parse_args(argv)
    reports: dict[str, list[dict]] = defaultdict(list)
    for spec in args.runs:
        family, _, directory = spec.partition("=")
        reports[family].append(json.loads((Path(directory) / "report.json").read_text()))
    summary = summarize(reports)
    text = table(summary)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": "python -m benchmarks.ln_free_expressivity " +
                                                         " ".join(args.runs), "families": summary}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
