"""`surgery continual --config RECIPE.yaml`: a continual-learning sequence with task-keyed norm sets and its baselines.

    surgery continual --config recipes/ln_tune/continual/minilm-vader.yaml [--out DIR] [--seed 1]
        [--order amazon,nyt,tweets,movies] [--no-save-model]

A sequence is many trainings (per task and stage, per method), so it has its own command instead of `surgery fit`;
each stage is still a Lightning fit (`surgery.ln_tune.continual.stages`). Writes <out>/metrics.json,
<out>/cl_matrix.png, one <method>.json per method (a rerun skips finished methods) and <out>/keyed_model.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="a recipe under recipes/ln_tune/continual/")
    parser.add_argument("--out", default=None, help="run directory (default: runs/ln_tune/continual/<recipe>-seed<N>)")
    parser.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
    parser.add_argument("--order", default=None, help="the recipe's tasks in another order, comma-separated")
    parser.add_argument("--no-save-model", action="store_true", help="do not write the keyed model and its sets")


def run(args) -> int:
    from surgery.ln_tune.continual.run import load_config, run_sequence
    from surgery.models.shipped import resolve_shipped

    path = resolve_shipped(args.config)
    config = load_config(path, args.seed, args.order.split(",") if args.order else None)
    out = args.out or f"runs/ln_tune/continual/{Path(path).stem}-seed{config.seed}"
    run_sequence(config, out, save_model=not args.no_save_model)
    print(f"wrote {out}/metrics.json and {out}/cl_matrix.png")
    return 0
