"""XATL vs from scratch: train a recipe twice (as written, and with nothing transferred or frozen) on the
same data, steps and learning rate, then plot both validation curves and report how many steps the XATL
run needs to reach the scratch run's final validation loss.

    python -m surgery.xatl.compare recipes/xatl/quickstart-mamba.yaml [--out runs/xatl/compare-mamba]
        [--steps 300] [-- extra LightningCLI overrides, e.g. --data.init_args.batch_size 4]

Writes <out>/xatl/ and <out>/scratch/ (ordinary run directories), <out>/compare.png and <out>/metrics.json
with `steps_to_match_scratch_final_loss` (null if never reached) and its ratio to the total steps.

Resumable: run the same command again after an interruption. An arm whose run directory holds metrics.json
is done and not retrained (delete the directory to retrain it); an arm with checkpoints/last.ckpt continues
from it, its validation curve so far kept in logs/metrics-<n>.csv (the CSV logger starts a new file).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from surgery.run import write_json


def _log_files(run_dir: Path) -> list[Path]:
    """The run's CSV logs, oldest first: logs kept at each resume (metrics-1.csv, ...), then metrics.csv."""
    logs = run_dir / "logs"
    parts = sorted(logs.glob("metrics-*.csv"), key=lambda p: int(p.stem.split("-")[1]))
    return parts + [p for p in [logs / "metrics.csv"] if p.exists()]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(optimizer steps done, val/loss) rows of a run's CSV logs, by step; where a resumed run logged a step
    again, its newer value wins. Lightning logs a validation run after N steps under step N - 1 (its step
    counter moves after the batch's hooks), hence the + 1."""
    rows = {}
    for path in _log_files(run_dir):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("val/loss"):
                    rows[int(row["step"]) + 1] = float(row["val/loss"])
    return sorted(rows.items())


def train_arm(recipe: str, run_dir: Path, args: list[str]) -> int:
    """Train one arm in `run_dir` (LightningCLI `args` added to the recipe), resuming where it stopped.
    Returns the optimizer steps it took."""
    done = run_dir / "metrics.json"
    if done.exists():
        print(f"{run_dir}: finished before (metrics.json), not retrained")
        return json.loads(done.read_text())["steps"]
    cli_args = ["fit", "--config", recipe, "--trainer.default_root_dir", str(run_dir), *args]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        log = run_dir / "logs" / "metrics.csv"
        if log.exists():
            log.rename(log.with_name(f"metrics-{len(_log_files(run_dir))}.csv"))
        print(f"{run_dir}: resuming from {last}")
        cli_args += ["--ckpt_path", str(last)]
    from surgery.lightning_cli import SurgeryCLI

    return SurgeryCLI(args=cli_args).trainer.global_step


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
    out = Path(args.out or f"runs/xatl/compare-{Path(args.recipe).stem}")
    if args.steps:
        extra += ["--trainer.max_steps", str(args.steps)]
    runs = {"xatl": [], "scratch": ["--model.init_args.transfer", "[]", "--model.init_args.freeze", "false"]}
    steps = {name: train_arm(args.recipe, out / name, [*extra, *own]) for name, own in runs.items()}
    xatl, scratch = val_curve(out / "xatl"), val_curve(out / "scratch")
    summary = summarize(xatl, scratch, steps["xatl"])
    write_json(out / "metrics.json", summary)
    plot(xatl, scratch, summary, out / "compare.png", f"XATL vs scratch: {Path(args.recipe).stem}")
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_val")}, indent=2))
    print(f"plot: {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
