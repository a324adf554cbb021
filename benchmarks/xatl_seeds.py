"""XATL over seeds: the source's loss, the XATL model's and the from-scratch arm's, from finished runs.

Each XATL run is `surgery fit --config recipes/xatl/quickstart-FAMILY-MIXER.yaml --seed_everything S
--trainer.default_root_dir DIR` (or the `xatl/` arm of `surgery compare`); a comparison directory
adds its `scratch/` arm. Every loss is the run's own evaluation on the whole validation split (`metrics.json`).

    python -m benchmarks.xatl_seeds pythia-gla=runs/xatl/qs-pythia-gla-s{0,1,2} \
        --compare pythia-gla=runs/xatl/compare-pythia-gla [--scratch NAME=COMPARE_DIR] --out benchmarks/xatl_families

prints a table and writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.removal_seeds import _seed


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(runs: list[Path], compares: list[Path] = (), scratch_only: list[Path] = ()) -> dict:
    """Per-run rows (XATL runs and the `xatl/` arms of `compares`) with the source's loss and the gap to it,
    the scratch arms' losses (of `compares` and `scratch_only`), and the mean and sample standard deviation of each."""
    rows, scratch = [], []
    for run in [*runs, *(c / "xatl" for c in compares)]:
        m = json.loads((run / "metrics.json").read_text())
        x = m["xatl"]
        rows.append({"run": str(run), "seed": _seed(run), "mixer": x["mixer"], "xatl": m["val"]["loss"],
                     "source": x["source_val_loss"], "gap_vs_source": x["gap_vs_source"],
                     "val_tokens": m["val"]["tokens"], "tokens_seen": m["tokens_seen"],
                     "attn_layers": x["attn_layers"], "train_time_s": m.get("train_time_s")})
    for c in [*compares, *scratch_only]:
        m = json.loads((c / "scratch" / "metrics.json").read_text())
        scratch.append({"run": str(c / "scratch"), "seed": _seed(c / "scratch"), "scratch": m["val"]["loss"]})
    sources = {round(r["source"], 6) for r in rows}
    if len(sources) > 1:
        raise ValueError(f"runs measured against different source losses {sorted(sources)}: not one source and split")
    out = {"runs": rows, "scratch_runs": scratch, "source": rows[0]["source"],
           "xatl": _stats([r["xatl"] for r in rows]), "gap_vs_source": _stats([r["gap_vs_source"] for r in rows])}
    if scratch:
        out["scratch"] = _stats([s["scratch"] for s in scratch])
        out["scratch_gap_vs_source"] = _stats([s["scratch"] - out["source"] for s in scratch])
    return out


def _pm(s: dict | None, sign: bool = False) -> str:
    if s is None:
        return "-"
    fmt = "{:+.3f}" if sign else "{:.4f}"
    return fmt.format(s["mean"]) + (f" ± {s['std']:.3f}" if s["n"] > 1 else "") + f" (n={s['n']})"


def table(results: dict[str, dict]) -> str:
    lines = ["| run set | mixer | source | XATL | XATL − source | from scratch | scratch − source |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['runs'][0]['mixer']} | {r['source']:.4f} | {_pm(r['xatl'])} | "
                     f"**{_pm(r['gap_vs_source'], True)}** | {_pm(r.get('scratch'))} | {_pm(r.get('scratch_gap_vs_source'), True)} |")
    return "\n".join(lines)


def _pairs(items: list[str], flag: str) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag} {item!r}: give NAME=RUN_DIR, e.g. pythia-gla=runs/xatl/qs-pythia-gla-s0")
        name, path = item.split("=", 1)
        out.setdefault(name, []).append(Path(path))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="NAME=RUN_DIR of finished XATL runs (repeat a NAME for its seeds)")
    p.add_argument("--compare", nargs="*", default=[], help="NAME=COMPARE_DIR of finished xatl.compare runs")
    p.add_argument("--scratch", nargs="*", default=[], help="NAME=COMPARE_DIR whose scratch arm alone counts (its XATL "
                   "arm trained with other settings than the runs of NAME)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    p.add_argument("--note", default="", help="a paragraph for OUT.md, above the table (what was run, on what)")
    args = p.parse_args(argv)
    runs, compares, scratch = _pairs(args.runs, "run"), _pairs(args.compare, "--compare"), _pairs(args.scratch, "--scratch")
    results = {name: summarize(runs.get(name, []), compares.get(name, []), scratch.get(name, []))
               for name in dict.fromkeys([*runs, *compares])}
    md = table(results)
    print(md)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text((args.note.strip() + "\n\n" if args.note.strip() else "") + md + "\n")


if __name__ == "__main__":
    main()
