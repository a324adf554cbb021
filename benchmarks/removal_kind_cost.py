"""Which point kinds cost most when they go: the training loss's jump at each removal, summed per kind, over seeds.

Reads finished removal runs (`surgery fit --config recipes/remove_ln/quickstart-FAMILY.yaml --seed_everything S
--trainer.default_root_dir DIR`): each `metrics.json` lists its removals with `loss_jump` (nats/token,
`surgery.remove_ln.report.loss_jumps`). Per run, a kind's cost is the sum of its points' jumps (every block's);
the table gives its mean and sample standard deviation over the runs of a family, and the mean jump per point.

    python -m benchmarks.removal_kind_cost qwen3=runs/remove_ln/qs-qwen3-s{0,1,2} gemma3=... olmo2=... \
        --out benchmarks/remove_ln_kind_cost

prints a table and writes OUT.json and OUT.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.removal_seeds import grouped_runs_main
from surgery.remove_ln.points import KINDS


def kind_costs(run: Path) -> dict[str, dict]:
    """{kind: {"sum": total jump of its points, "points": how many}} of one run, kinds in removal order."""
    removed = json.loads((run / "metrics.json").read_text())["removed"]
    missing = [r["point"] for r in removed if r.get("loss_jump") is None]
    if missing:
        raise SystemExit(f"{run}/metrics.json has no loss_jump for {missing[:3]}: rerun it with this version of surgery")
    out: dict[str, dict] = {}
    for r in removed:
        kind = r["point"].rsplit(".", 1)[-1]
        entry = out.setdefault(kind, {"sum": 0.0, "points": 0})
        entry["sum"] += r["loss_jump"]
        entry["points"] += 1
    return {k: out[k] for k in KINDS if k in out}


def summarize(runs: list[Path]) -> dict[str, dict]:
    """{kind: mean and sample sd over runs of its summed jump, and the mean jump per point}."""
    per_run = [kind_costs(run) for run in runs]
    out = {}
    for kind in [k for k in KINDS if k in per_run[0]]:
        sums = [r[kind]["sum"] for r in per_run]
        out[kind] = {"mean": statistics.fmean(sums), "std": statistics.stdev(sums) if len(sums) > 1 else 0.0,
                     "per_point": statistics.fmean(sums) / per_run[0][kind]["points"], "runs": len(sums)}
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| family | kind | summed loss jump (nats/token), mean ± sd | per point | runs |", "|---|---|---:|---:|---:|"]
    for family, kinds in results.items():
        for kind, r in sorted(kinds.items(), key=lambda kv: -kv[1]["mean"]):
            lines.append(f"| {family} | `{kind}` | {r['mean']:+.4f} ± {r['std']:.4f} | {r['per_point']:+.4f} | {r['runs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    grouped_runs_main(summarize, table, __doc__, argv)


if __name__ == "__main__":
    main()
