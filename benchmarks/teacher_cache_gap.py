"""The LN-removal quick start distilled from the cached top-k teacher vs the live teacher: bracket gap over seeds.

    OMP_NUM_THREADS=1 python -m benchmarks.teacher_cache_gap [--seeds 0 1 2] [--arms k32 k128 live] \
        [--runs runs/remove_ln/cache-gap] [--out benchmarks/teacher_cache_gap]

1. Builds the teacher caches (`surgery.data.teacher_cache`) for every k of the arms, for the training blocks the
   seeds visit in the recipe's steps (each seed's epoch-0 order from `EpochShuffle`), in one teacher pass.
2. Runs `surgery fit --config recipes/remove_ln/quickstart.yaml --seed_everything S` per arm and seed, arm by
   arm (arm `kK` adds `--model.init_args.distill.teacher_top_k K`; `live` runs the teacher on every batch), one at
   a time; a run whose metrics.json exists is skipped, so the script resumes where it stopped. After each cached
   run it checks that the run found every block in the cache (no teacher forward during training).
3. Summarizes with `benchmarks.removal_seeds.summarize` (mean and sample sd of the losses and gaps), prints a table,
   writes OUT.json and OUT.md. `--keep OUT.json` takes an earlier record's arms where no run finished here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.measure import machine_info
from benchmarks.removal_seeds import summarize, table
from surgery.data import TokenBlocks
from surgery.data.resumable import EpochShuffle
from surgery.data.teacher_cache import TeacherCache, model_key
from surgery.models.loading import load_causal_lm

RECIPE = Path("recipes/remove_ln/quickstart.yaml")


def arm_k(arm: str) -> int | None:
    return None if arm == "live" else int(arm.removeprefix("k"))


def build_caches(recipe: dict, seeds: list[int], ks: list[int], extra_steps: int) -> dict[int, TeacherCache]:
    """Caches for each k, filled for the blocks the seeds visit in max_steps (+ extra_steps for skipped batches)."""
    data = recipe["data"]["init_args"]
    dm = TokenBlocks(data["data"], data["tokenizer"], data["block_size"], data["batch_size"])
    blocks = dm.split("train")
    teacher = load_causal_lm(recipe["model"]["init_args"]["init"]).eval()
    key = model_key(teacher)
    caches = {k: TeacherCache(blocks.tokens, blocks.block_size, k, key, teacher.config.vocab_size) for k in ks}
    steps = recipe["trainer"]["max_steps"] + extra_steps
    rows = sorted({r for s in seeds for r in list(EpochShuffle(len(blocks), s))[: steps * dm.batch_size]})
    todo = [r for r in rows if not all(c.filled[r] for c in caches.values())]
    print(f"teacher cache: {len(rows)} blocks visited by seeds {seeds}, {len(todo)} to compute, k = {ks}", flush=True)
    start = time.time()
    with torch.no_grad():
        for i in range(0, len(todo), 8):
            chunk = np.asarray(todo[i : i + 8])
            log_probs = torch.log_softmax(teacher(torch.stack([blocks[r] for r in chunk])).logits.float(), dim=-1)
            for cache in caches.values():
                cache._store(chunk, log_probs)
    print(f"teacher cache: built in {time.time() - start:.0f} s", flush=True)
    return caches


def run_arm(run: Path, seed: int, k: int | None) -> None:
    cmd = [sys.executable, "-m", "surgery.cli", "fit", "--config", str(RECIPE), "--seed_everything", str(seed),
           "--trainer.default_root_dir", str(run)]
    if k is not None:
        cmd += ["--model.init_args.distill.teacher_top_k", str(k)]
    run.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%H:%M:%S')} running {' '.join(cmd)}", flush=True)
    with open(run / "fit.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["k32", "k128", "live"])
    parser.add_argument("--runs", type=Path, default=Path("runs/remove_ln/cache-gap"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/teacher_cache_gap"))
    parser.add_argument("--extra-steps", type=int, default=10, help="blocks cached beyond max_steps (guard-skipped batches)")
    parser.add_argument("--summarize-only", action="store_true", help="build and run nothing: tabulate the finished runs")
    parser.add_argument("--live-record", default=None, help="FILE.json:GROUP, a removal_seeds record of live-teacher runs "
                                                            "of the same recipe, added to the table as 'live (recorded)'")
    parser.add_argument("--keep", type=Path, default=None,
                        help="an earlier OUT.json: its arms stand in for arms with no finished run here")
    args = parser.parse_args(argv)
    recipe = yaml.safe_load(RECIPE.read_text())
    ks = [k for k in map(arm_k, args.arms) if k is not None]
    caches = {} if args.summarize_only else build_caches(recipe, args.seeds, ks, args.extra_steps)
    for arm in [] if args.summarize_only else args.arms:  # arm by arm: the first arm's seeds finish first
        for seed in args.seeds:
            run = args.runs / f"{arm}-s{seed}"
            if (run / "metrics.json").exists():
                continue
            k = arm_k(arm)
            filled = int(caches[k].filled.sum()) if k else 0
            run_arm(run, seed, k)
            if k and int(caches[k].filled.sum()) != filled:
                print(f"warning: {run} computed {int(caches[k].filled.sum()) - filled} blocks with the teacher", flush=True)
    groups = {arm: [args.runs / f"{arm}-s{s}" for s in args.seeds] for arm in args.arms}
    done = {arm: [r for r in runs if (r / "metrics.json").exists()] for arm, runs in groups.items()}
    kept = json.loads(args.keep.read_text())["arms"] if args.keep else {}
    results = {arm: summarize(runs) if runs else kept[arm] for arm, runs in done.items() if runs or arm in kept}
    if args.live_record:
        path, _, group = args.live_record.rpartition(":")
        results["live (recorded)"] = json.loads(Path(path).read_text())[group]
    md = table(results)
    print(md)
    record = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "recipe": str(RECIPE), "seeds": args.seeds,
              "arms": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
