"""XATL vs from scratch: train a recipe twice (as written, and with nothing transferred or frozen) on the
same data, steps and learning rate, then plot both validation curves and report how many steps the XATL
run needs to reach the scratch run's final validation loss.

    surgery compare recipes/xatl/quickstart-mamba.yaml [--out runs/xatl/compare-mamba]
        [--steps 300] [-- extra LightningCLI overrides, e.g. --data.init_args.batch_size 4]

Writes <out>/xatl/ and <out>/scratch/ (ordinary run directories), <out>/compare.png and <out>/metrics.json
with `steps_to_match_scratch_final_loss` (null if never reached) and its ratio to the total steps.

Resumable: run the same command again after an interruption. An arm whose run directory holds metrics.json
is done and not retrained (delete the directory to retrain it); an arm with checkpoints/last.ckpt continues
from it, its validation curve so far kept in logs/metrics-<n>.csv (the CSV logger starts a new file).
<out>/command.json records the recipe, steps and overrides: a rerun into the same --out with other ones is
refused rather than mixing arms trained for different settings.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from surgery.errors import SurgeryError


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


def _override(args: list[str], key: str) -> str | None:
    """The last value given to `--key` in LightningCLI arguments (`--key value` or `--key=value`)."""
    value = None
    for i, arg in enumerate(args):
        if arg == f"--{key}" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def planned_steps(recipe: str, extra: list[str]) -> tuple[int | None, object, object]:
    """(trainer.max_steps, trainer.val_check_interval, trainer.check_val_every_n_epoch) of the recipe with the
    overrides in `extra`, as far as they can be read without building the run."""
    trainer = (yaml.safe_load(Path(recipe).read_text()) or {}).get("trainer") or {}
    values = []
    for key in ("max_steps", "val_check_interval", "check_val_every_n_epoch"):
        given = _override(extra, f"trainer.{key}")
        values.append(trainer.get(key) if given is None else yaml.safe_load(given))
    return tuple(values)


def check_command(out: Path, command: dict) -> None:
    """Refuse to reuse `out` for a comparison with another recipe, step count or overrides; record it otherwise."""
    path = out / "command.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"{k}: {json.dumps(before.get(k))} -> {json.dumps(v)}" for k, v in command.items() if before.get(k) != v]
        if changed:
            raise SurgeryError(
                f"{out} holds a comparison made with other settings ({'; '.join(changed)}): its arms would not be "
                f"comparable with this command's. Choose another --out, or delete {out} to redo it"
            )
    from surgery.training.run import write_json  # here, not at the top: `surgery compare --help` imports no torch

    out.mkdir(parents=True, exist_ok=True)
    write_json(path, command)


def arm_metrics(run_dir: Path) -> dict:
    """A finished arm's metrics.json; {} where it wrote none (unfinished, or the export turned off)."""
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def kept_layers(run_dir: Path) -> list[str]:
    """LightningCLI arguments that keep the attention layers a finished XATL arm kept (its metrics.json), so
    the scratch arm has the same architecture when the recipe says `attn_layers: auto`; none without metrics."""
    metrics = arm_metrics(run_dir)
    if not metrics:
        return []
    return ["--model.init_args.attn_layers", json.dumps(metrics["xatl"]["attn_layers"])]


def train_arm(recipe: str, run_dir: Path, args: list[str], steps: int | None = None) -> int:
    """Train one arm in `run_dir` (LightningCLI `args` added to the recipe), resuming where it stopped.
    Returns the optimizer steps it took. A finished arm of another step count than `steps` is refused."""
    done = run_dir / "metrics.json"
    if done.exists():
        finished = json.loads(done.read_text())["steps"]
        if steps is not None and finished != steps:
            raise SurgeryError(f"{run_dir} finished {finished} steps before, this comparison asks for {steps}: "
                               f"choose another --out, or delete {run_dir} to retrain it")
        print(f"{run_dir}: finished before (metrics.json), not retrained")
        return finished
    cli_args = ["fit", "--config", recipe, "--trainer.default_root_dir", str(run_dir), *args]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        log = run_dir / "logs" / "metrics.csv"
        if log.exists():
            log.rename(log.with_name(f"metrics-{len(_log_files(run_dir))}.csv"))
        print(f"{run_dir}: resuming from {last}")
        cli_args += ["--ckpt_path", str(last)]
    from surgery.cli.lightning_cli import SurgeryCLI
    from surgery.training.run_lock import release_all

    try:
        return SurgeryCLI(args=cli_args).trainer.global_step
    finally:
        release_all()  # the arm's run directory lock


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


def full_validation(out: Path) -> dict:
    """Each arm's loss on the whole validation split (from its metrics.json) and the source's own on the same
    split: {"source_full_val", "xatl_full_val", "scratch_full_val", "xatl_gap_vs_source"} (nats/token; None
    where an arm wrote no metrics.json, e.g. with the export turned off)."""
    arms = {name: arm_metrics(out / name) for name in ("xatl", "scratch")}
    source = (arms["xatl"].get("xatl") or {}).get("source_val_loss")
    xatl, scratch = ((arms[n].get("val") or {}).get("loss") for n in ("xatl", "scratch"))
    return {"source_full_val": source, "xatl_full_val": xatl, "scratch_full_val": scratch,
            "xatl_gap_vs_source": None if source is None or xatl is None else xatl - source}


def xatl_label(run_dir: Path) -> str:
    """What the XATL arm's transferred weights did, from its final checkpoint: frozen until step N, never
    unfrozen (max_steps below the unfreeze step, or neither an unfreeze step nor a threshold), or trained
    throughout."""
    from surgery.models.loading import read_checkpoint

    try:
        unfrozen_at = read_checkpoint(run_dir / "checkpoints" / "last.ckpt").get("xatl_unfrozen_at", -1)
    except SurgeryError:
        unfrozen_at = -1
    if unfrozen_at == -1:
        return "XATL (transferred)"
    if unfrozen_at is None:
        return "XATL (transferred, frozen throughout: never unfrozen)"
    return "XATL (transferred, trained throughout)" if unfrozen_at == 0 else f"XATL (transferred, frozen until step {unfrozen_at})"


def plot(xatl, scratch, summary: dict, path: Path, title: str, xatl_name: str = "XATL (transferred)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*xatl), marker="o", ms=3, label=xatl_name)
    ax.plot(*zip(*scratch), marker="o", ms=3, label="from scratch")
    ax.axhline(summary["scratch_final_val_loss"], color="gray", lw=0.8, ls="--")
    if summary["steps_to_match_scratch_final_loss"] is not None:
        ax.axvline(summary["steps_to_match_scratch_final_loss"], color="gray", lw=0.8, ls=":")
    ax.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def forget_comparison(out: Path, remove_dir: bool) -> None:
    """Undo what a comparison refused before training wrote: `out` itself when this command made it, else its
    command.json and the XATL arm's run directory."""
    import shutil

    if remove_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    (out / "command.json").unlink(missing_ok=True)
    shutil.rmtree(out / "xatl", ignore_errors=True)


def add_arguments(parser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--out", default=None, help="default: runs/xatl/compare-<recipe name>")
    parser.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")


def run(args) -> int:
    """Train both arms (resumable), then compare them; `args.overrides` are the LightningCLI arguments after `--`."""
    from surgery.training.run import write_json

    extra = list(args.overrides)
    if not Path(args.recipe).is_file():
        raise SurgeryError(f"recipe {args.recipe!r} does not exist")
    out = Path(args.out or f"runs/xatl/compare-{Path(args.recipe).stem}")
    if args.steps:
        extra += ["--trainer.max_steps", str(args.steps)]
    steps, interval, every_n_epochs = planned_steps(args.recipe, extra)
    if isinstance(steps, int) and isinstance(interval, int) and every_n_epochs is None and 0 < steps < interval:
        raise SurgeryError(
            f"{steps} steps is fewer than trainer.val_check_interval={interval}: no validation loss would be logged to "
            f"compare. Use --steps {interval} or more, or add -- --trainer.val_check_interval {max(1, steps // 4)}"
        )
    new_out, new_command = not out.exists(), not (out / "command.json").exists()
    check_command(out, {"recipe": str(Path(args.recipe).resolve()), "steps": steps, "overrides": list(args.overrides)})
    budget = steps if isinstance(steps, int) and steps > 0 else None
    try:
        steps_done = {"xatl": train_arm(args.recipe, out / "xatl", extra, budget)}
    except BaseException:
        if new_command and not (out / "xatl" / "checkpoints").exists():
            forget_comparison(out, new_out)  # refused before any training: a corrected rerun starts afresh
        raise
    # the scratch arm: same architecture (the attention layers the XATL arm kept, `auto` included), data, steps
    # and lr, nothing copied or frozen, next-token loss only
    scratch_args = ["--model.init_args.transfer", "[]", "--model.init_args.freeze", "false", "--model.init_args.align",
                    "null", "--model.init_args.distill", "null", *kept_layers(out / "xatl")]
    steps_done["scratch"] = train_arm(args.recipe, out / "scratch", [*extra, *scratch_args], budget)
    xatl, scratch = val_curve(out / "xatl"), val_curve(out / "scratch")
    if not xatl or not scratch:
        raise SurgeryError(
            f"no validation loss was logged in {out / 'xatl' if not xatl else out / 'scratch'} (logs/metrics.csv): "
            "trainer.val_check_interval must be at most the number of steps"
        )
    summary = summarize(xatl, scratch, steps_done["xatl"])
    summary.update(full_validation(out))
    write_json(out / "metrics.json", summary)
    plot(xatl, scratch, summary, out / "compare.png", f"XATL vs scratch: {Path(args.recipe).stem}", xatl_label(out / "xatl"))
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_val")}, indent=2))
    print(f"plot: {out / 'compare.png'}")
    return 0

