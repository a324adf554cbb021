"""Norm removal over seeds: original, control, LN-free and the gaps, mean and spread, from finished runs.

Each run is `surgery fit --config recipes/remove_ln/quickstart[-FAMILY].yaml --seed_everything S
--trainer.default_root_dir DIR`; its `metrics.json` holds the validation losses on the whole validation split.

    python -m benchmarks.removal_seeds gpt2=runs/remove_ln/qs-distill-s{0,1,2} pythia=runs/remove_ln/qs-pythia-s{0,1,2} \
        --out benchmarks/remove_ln_families

prints a table (with `--keep OLD.json`, also the groups of an earlier record that are not named again) and writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("original", "control (LN kept)", "LN-free")
GAPS = ("gap_vs_original", "gap_vs_control", "gap_vs_best")


def summarize(runs: list[Path]) -> dict:
    """Per-seed rows and the mean and sample standard deviation of every loss and gap."""
    rows = []
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        rows.append({"run": str(run), "seed": _seed(run), **{k: m["val_loss"][k] for k in KEYS}, **{g: m[g] for g in GAPS},
                     "export_rel_diff": m["export_logit_diff"]["relative"], "train_time_s": m.get("train_time_s"),
                     "val_tokens": m["val"]["tokens"]})
    out = {"runs": rows}
    for key in KEYS + GAPS:
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def _seed(run: Path) -> int | None:
    config = run / "logs" / "config.yaml"
    if config.exists():
        for line in config.read_text().splitlines():
            if line.startswith("seed_everything:"):
                return int(line.split(":")[1])
    return None


def table(results: dict[str, dict]) -> str:
    head = "| model | seeds | original | control | LN-free | LN-free − original | LN-free − control | bracket gap |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        seeds = ", ".join(str(x["seed"]) for x in r["runs"])
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in KEYS] + [f"{r[g]['mean']:+.4f} ± {r[g]['std']:.4f}" for g in GAPS]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grouped_runs_main(summarize, table, description: str, argv: list[str] | None = None) -> None:
    """The command line of a benchmark over groups of finished runs: NAME=RUN_DIR[,RUN_DIR...] arguments, each group
    `summarize`d, the `table` of all printed and written to OUT.md, the summaries to OUT.json."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="NAME=RUN_DIR[,RUN_DIR...] (or NAME=DIR repeated)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", type=Path, default=None,
                        help="an earlier OUT.json: its groups not named here stay in the record, first, as they were")
    args = parser.parse_args(argv)
    groups: dict[str, list[Path]] = {}
    for item in args.groups:
        name, _, run = item.partition("=")
        groups.setdefault(name, []).extend(Path(r) for r in run.split(","))
    kept = json.loads(args.keep.read_text()) if args.keep else {}
    results = {name: r for name, r in kept.items() if name not in groups}
    results.update({name: summarize(runs) for name, runs in groups.items()})
    md = table(results)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n")


def main(argv: list[str] | None = None) -> None:
    grouped_runs_main(summarize, table, __doc__, argv)


if __name__ == "__main__":
    main()
