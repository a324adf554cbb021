"""The `surgery` entry point.

`surgery fit|validate|test --config RECIPE.yaml` runs a recipe through Lightning's `LightningCLI`;
the other subcommands (eval, export, verify, publish, compare) are plain argparse commands, each a
module in `surgery.cli.commands` with `add_arguments(parser)` and `run(args) -> int`, imported only when called.
Arguments after `--` reach a command as `args.overrides` (LightningCLI arguments, for `compare`); the others
refuse them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from surgery.errors import SurgeryError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# name -> (module, one-line help); imported only when called, so `surgery --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("surgery.cli.commands.eval", "cross-entropy and perplexity of a model on held-out data; "
             "standard benchmarks through lm-evaluation-harness (--tasks)"),
    "export": ("surgery.cli.commands.export", "a run's checkpoint as a plain Hugging Face model: LN-free after a finished "
               "LayerNorm removal; a checkpoint taken mid-removal (some norms still real) is refused"),
    "verify": ("surgery.cli.commands.verify", "check an (LN-free) model in TransformerLens: logits, exact DLA, patching, sinks"),
    "publish": ("surgery.cli.commands.publish", "upload a run or model to the Hugging Face Hub with a card built from its measurements"),
    "continual": ("surgery.cli.commands.continual", "continual learning with task-keyed norm sets vs sequential and "
                  "joint fine-tuning over a task sequence (resumable; metrics.json and the CL matrix plot)"),
    "compare": ("surgery.cli.commands.compare", "XATL vs from scratch: train a recipe both ways on the same data and steps, "
                "plot both validation curves, report steps-to-match (resumable; LightningCLI overrides after --)"),
}


def shipped_configs(argv: list[str]) -> list[str]:
    """`--config recipes/...` (or `-c`, `--config=`) missing in the current directory names the shipped recipe."""
    from surgery.models.shipped import resolve_shipped

    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_shipped(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_shipped(arg[len("--config="):])
    return out


def run_lightning(argv: list[str]) -> int:
    from surgery.cli.lightning_cli import SurgeryCLI
    from surgery.training.run_lock import release_all

    argv = shipped_configs(argv)

    try:
        SurgeryCLI(args=argv)
    finally:
        release_all()  # the run directory's lock, taken by `fit`
    return 0


def _usage() -> str:
    lines = ["usage: surgery {fit,validate,test} --config RECIPE.yaml [overrides]", "       surgery COMMAND ...", "", "commands:"]
    lines += [f"  {n:<9} run a Lightning recipe ({n})" for n in LIGHTNING_SUBCOMMANDS[:3]]
    lines += [f"  {n:<9} {help_}" for n, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from surgery.cli.quiet import silence_known_noise

    silence_known_noise()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0]
    try:
        if name in LIGHTNING_SUBCOMMANDS:
            return run_lightning(argv)
        if name not in COMMANDS:
            print(f"surgery: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
            return 2
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"surgery {name}", description=COMMANDS[name][1])
        module.add_arguments(parser)
        rest = argv[1:]
        cut = rest.index("--") if "--" in rest else len(rest)
        args = parser.parse_args(rest[:cut])
        args.overrides = rest[cut + 1:]
        if args.overrides and name != "compare":
            parser.error(f"arguments after -- ({' '.join(args.overrides)}) are LightningCLI overrides, which only "
                         "`surgery compare` takes")
        return module.run(args)
    except SurgeryError as err:
        print(f"surgery {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
