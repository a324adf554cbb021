"""XATL vs from scratch: train a recipe twice (as written, and with nothing transferred or frozen) on the
same data, steps and learning rate, then plot both validation curves and report how many steps the XATL
run needs to reach the scratch run's final validation loss.

    python -m surgery.xatl.compare recipes/xatl/quickstart-mamba.yaml [--out runs/xatl/compare-mamba]
        [--steps 300] [-- extra LightningCLI overrides, e.g. --data.init_args.batch_size 4]

Writes <out>/xatl/ and <out>/scratch/ (ordinary run directories), <out>/compare.png and <out>/metrics.json
with `steps_to_match_scratch_final_loss` (null if never reached) and its ratio to the total steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from surgery.run import write_json


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(optimizer steps done, val/loss) rows of a run's CSV log, in order. Lightning logs a validation
    run after N steps under step N - 1 (its step counter moves after the batch's hooks), hence the + 1."""
    rows = []
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val/loss"):
                rows.append((int(row["step"]) + 1, float(row["val/loss"])))
    return rows


def steps_to_match(curve: list[tuple[int, float]], target: float) -> int | None:
    """First logged step at which `curve` is at or below `target`."""
    return next((step for step, loss in curve if loss <= target), None)


def summarize(xatl: list[tuple[int, float]], scratch: list[tuple[int, float]], total_steps: int) -> dict:
    final = scratch[-1][1]
    match = steps_to_match(xatl, final)
    return {
        "total_steps": total_steps,
        "scratch_final_val_loss": final,
        "xatl_final_val_loss": xatl[-1][1],
        "steps_to_match_scratch_final_loss": match,
        "steps_to_match_ratio": None if match is None else match / total_steps,
        "xatl_val": xatl,
        "scratch_val": scratch,
    }


def plot(xatl, scratch, summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*xatl), marker="o", ms=3, label="XATL (transferred, frozen then unfrozen)")
    ax.plot(*zip(*scratch), marker="o", ms=3, label="from scratch")
    ax.axhline(summary["scratch_final_val_loss"], color="gray", lw=0.8, ls="--")
    if summary["steps_to_match_scratch_final_loss"] is not None:
        ax.axvline(summary["steps_to_match_scratch_final_loss"], color="gray", lw=0.8, ls=":")
    ax.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--out", default=None, help="default: runs/xatl/compare-<recipe name>")
    parser.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1 :]  # after --: LightningCLI arguments for both runs
    from surgery.lightning_cli import SurgeryCLI

    out = Path(args.out or f"runs/xatl/compare-{Path(args.recipe).stem}")
    if args.steps:
        extra += ["--trainer.max_steps", str(args.steps)]
    runs = {"xatl": [], "scratch": ["--model.init_args.transfer", "[]", "--model.init_args.freeze", "false"]}
    steps = {}
    for name, own in runs.items():
        cli = SurgeryCLI(args=["fit", "--config", args.recipe, "--trainer.default_root_dir", str(out / name), *extra, *own])
        steps[name] = cli.trainer.global_step
    xatl, scratch = val_curve(out / "xatl"), val_curve(out / "scratch")
    summary = summarize(xatl, scratch, steps["xatl"])
    write_json(out / "metrics.json", summary)
    plot(xatl, scratch, summary, out / "compare.png", f"XATL vs scratch: {Path(args.recipe).stem}")
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_val")}, indent=2))
    print(f"plot: {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
