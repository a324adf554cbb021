"""Shared depth on the tiny checkpoints: unique parameters against the gap to the original, over seeds.

Runs `surgery fit --config recipes/share/FAMILY.yaml --seed_everything S --trainer.default_root_dir DIR [ARM
OVERRIDES]` for every family, arm and seed not yet finished (a run whose metrics.json exists is read, not rerun;
an interrupted run resumes), then prints the table and writes OUT.json and OUT.md. Also measures, without training,
the full-rank relaxation's validation loss at its start against the original's (the whole validation split).

    OMP_NUM_THREADS=1 python -m benchmarks.share_depth --out benchmarks/share_depth            # everything
    python -m benchmarks.share_depth --families gpt2 --arms K2 K1 --seeds 0 1 2 --out /tmp/share   # a part
    python -m benchmarks.share_depth --no-train --keep benchmarks/share_depth.json --out benchmarks/share_depth
                                    # runs finished here, and the earlier record's rows for the pairs not run here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FAMILIES = ("gpt2", "pythia", "llama")
S = "--model.init_args.share."
ARMS = {  # name: (description, overrides of recipes/share/FAMILY.yaml)
    "K2": ("K = L/2 = 2 blocks (cycle), individual norms", []),
    "K1": ("K = L/4 = 1 block, individual norms", [S + "groups", "cycle:1"]),
    "K2-shared-norms": ("K = 2, norms shared with the block (WideNet's ablation)", [S + "norms", "shared"]),
    "K2-r4": ("K = 2, relaxation rank 4", [S + "relax_rank", "4"]),
    "K2-r16": ("K = 2, relaxation rank 16", [S + "relax_rank", "16"]),
    "K2-full": ("K = 2, full-rank relaxation", [S + "relax_rank", "full"]),
}


def run_one(family: str, arm: str, seed: int, root: Path) -> Path:
    run = root / family / arm / f"s{seed}"
    if not (run / "metrics.json").exists():
        args = [sys.executable, "-m", "surgery.cli", "fit", "--config", f"recipes/share/{family}.yaml",
                "--seed_everything", str(seed), "--trainer.default_root_dir", str(run), *ARMS[arm][1]]
        print(" ".join(args[2:]), flush=True)
        subprocess.run(args, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return run


def collect(families: list[str], arms: list[str], seeds: list[int], root: Path, train: bool, kept: dict) -> dict:
    """(family, arm) -> statistics of its finished runs (training the missing ones first when `train`); a pair with
    no finished run takes the row of an earlier record, `kept` ("family/arm" -> row), when it has one."""
    results = {}
    for arm in arms:  # arm by arm, so that a partial sweep already compares families
        for family in families:
            runs = [run_one(family, arm, s, root) if train else root / family / arm / f"s{s}" for s in seeds]
            runs = [r for r in runs if (r / "metrics.json").exists()]
            if runs:
                results[(family, arm)] = summarize(runs)
            elif f"{family}/{arm}" in kept:
                results[(family, arm)] = kept[f"{family}/{arm}"]
    return results


def full_rank_start(family: str) -> dict:
    """Validation loss of the original and of its full-rank relaxed K = 2 twin before any training."""
    from surgery.data import TokenBlocks
    from surgery.eval.loss import cross_entropy
    from surgery.models.loading import load_causal_lm
    from surgery.share import ShareConfig, share_depth

    path = f"checkpoints/tiny-{family}-stdlib"
    data = TokenBlocks(data="stdlib", tokenizer=path, block_size=256, batch_size=8)
    data.setup("validate")
    blocks = data.split("validation")
    original = load_causal_lm(path)
    shared = share_depth(original, ShareConfig(groups="cycle:2", relax_rank="full"))
    a, b = cross_entropy(original, blocks, 8, progress=False), cross_entropy(shared, blocks, 8, progress=False)
    return {"original": a["loss"], "shared_full_rank_at_start": b["loss"], "difference": b["loss"] - a["loss"],
            "tokens": a["tokens"]}


def summarize(runs: list[Path]) -> dict:
    rows = []
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        s = m["share"]
        rows.append({"run": str(run), "original": s["original_val_loss"], "shared": m["val"]["loss"],
                     "gap": s["gap_vs_original"], "unique_params": s["unique_params"],
                     "original_params": s["original_params"], "expanded_logit_diff": s.get("expanded_logit_diff"),
                     "train_time_s": m.get("train_time_s"), "tokens_seen": m.get("tokens_seen")})
    out = {"runs": rows}
    for key in ("original", "shared", "gap"):
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def norms_ablation(results: dict) -> dict:
    """Per family with both arms: shared-norm gap minus individual-norm gap, seed by seed (same seed, same batches)."""
    out = {}
    for family in {f for f, _ in results}:
        ind, sh = results.get((family, "K2")), results.get((family, "K2-shared-norms"))
        if ind and sh:
            by_seed = {Path(r["run"]).name: r["gap"] for r in ind["runs"]}
            diffs = [r["gap"] - by_seed[Path(r["run"]).name] for r in sh["runs"] if Path(r["run"]).name in by_seed]
            if diffs:
                out[family] = {"seeds": len(diffs), "differences": diffs, "mean": statistics.fmean(diffs),
                               "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
    return out


def table(results: dict, starts: dict) -> str:
    lines = ["| family | arm | seeds | unique params (share of original) | original | shared | gap to original |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (family, arm), r in results.items():
        p = r["runs"][0]
        lines.append(f"| {family} | {ARMS[arm][0]} | {len(r['runs'])} | {p['unique_params']:,} "
                     f"({p['unique_params'] / p['original_params']:.0%}) | {r['original']['mean']:.4f} | "
                     f"{r['shared']['mean']:.4f} ± {r['shared']['std']:.4f} | {r['gap']['mean']:+.4f} ± {r['gap']['std']:.4f} |")
    ablation = norms_ablation(results)
    if ablation:
        lines += ["", "| family | seeds | gap with shared norms − gap with individual norms (paired by seed) |", "|---|---:|---:|"]
        lines += [f"| {f} | {a['seeds']} | {a['mean']:+.4f} ± {a['std']:.4f} |" for f, a in sorted(ablation.items())]
    if starts:
        lines += ["", "| family | original | full-rank relaxation at its start | difference | validation tokens |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {f} | {s['original']:.6f} | {s['shared_full_rank_at_start']:.6f} | {s['difference']:+.1e} | "
                  f"{s['tokens']:,} |" for f, s in starts.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/share/bench"))
    parser.add_argument("--no-train", action="store_true", help="only summarize the runs that finished")
    parser.add_argument("--keep", type=Path, default=None,
                        help="an earlier OUT.json: its rows stand in for family/arm pairs with no finished run here")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    kept = json.loads(args.keep.read_text())["results"] if args.keep else {}
    results = collect(args.families, args.arms, args.seeds, args.root, not args.no_train, kept)
    starts = {f: full_rank_start(f) for f in args.families}
    md = table(results, starts)
    print(md)
    from benchmarks.measure import machine_info

    machine = machine_info()
    header = ["# Shared depth on the tiny checkpoints", "",
              "Each run: `surgery fit --config recipes/share/FAMILY.yaml --seed_everything S` plus the arm's overrides "
              "(150 steps of 8 x 256 tokens = 307k tokens; 0.5 x CE + 1 x KL to the original + 0.1 x hidden-state "
              "alignment; losses on the whole validation split). Unique parameters include the tied embeddings "
              "(524,288 of the original's 1,350,400 for the tiny GPT-2).", "",
              f"Command: `OMP_NUM_THREADS=1 python -m benchmarks.share_depth --families {' '.join(args.families)} "
              f"--arms {' '.join(args.arms)}{f' --keep {args.keep}' if args.keep else ''} --out {args.out}`. Machine: {machine['cpu']}, {machine['cores']} cores "
              f"shared with other jobs, torch {machine['torch']}, transformers {machine['transformers']}, "
              f"{machine['date'][:10]}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"results": {f"{f}/{a}": r for (f, a), r in results.items()}, "full_rank_start": starts,
              "norms_ablation": norms_ablation(results), "machine": machine,
              "arms": {a: ARMS[a][0] for a in args.arms}}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(header) + "\n" + md + "\n")


if __name__ == "__main__":
    main()
