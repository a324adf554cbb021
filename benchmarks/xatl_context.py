"""XATL models against their source at several context lengths: the gap at the training length and at the
source's full context, mean ± sd over seeds, and a plot of gap vs length.

Each run is a finished `surgery fit` run directory (its exported `model/`, its `logs/config.yaml` for the seed
and the training block size, its `metrics.json` for the source). Every model and the source are scored on the
whole validation split of the run's corpus cut into blocks of each length (as `surgery eval --block-size L`);
per-run results (and the source's) are cached in `<run>/context_eval.json`, so a rerun only scores what is new; at the training length
the run's own final evaluation (`metrics.json`: the same split and block size) is used.

    python -m benchmarks.xatl_context gpt2-mamba2=runs/xatl/qs-gpt2-mamba2-s{0,1,2} \
        --lengths 64 128 256 --out benchmarks/xatl_context

prints a table and writes OUT.json, OUT.md (with the machine and date) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.measure import machine_info
from benchmarks.removal_seeds import _seed
from benchmarks.xatl_seeds import _pairs


def _data_args(run: Path) -> dict:
    """The run's data.init_args (corpus, block_size, ...) from its logs/config.yaml."""
    import yaml

    return yaml.safe_load((run / "logs" / "config.yaml").read_text())["data"]["init_args"]


def score(model_path: str, tokenizer: str, data: str, length: int, batch_size: int = 16) -> float:
    """Cross-entropy (nats/token) of a model on the whole validation split of `data` in `length`-token blocks."""
    from surgery.data import TokenBlocks
    from surgery.eval.loss import cross_entropy
    from surgery.models.loading import load_causal_lm

    model = load_causal_lm(model_path)
    blocks = TokenBlocks(data, tokenizer, length, batch_size).split("validation")
    return cross_entropy(model, blocks, batch_size, progress=False)["loss"]


def run_losses(run: Path, lengths: list[int], source_cache: dict) -> dict:
    """{"run", "seed", "mixer", "attn_layers", "train_length", "loss": {L: nats}, "source": {L: nats}} of one run."""
    metrics = json.loads((run / "metrics.json").read_text())
    cache_file = run / "context_eval.json"
    cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    source = metrics["started_from"]["local_path"]
    data_args = _data_args(run)
    data = data_args["data"]
    losses = {int(k): v for k, v in cached.get("loss", {}).items()}
    train_length = int(data_args["block_size"])  # the run's own final evaluation: whole split at that length
    losses.setdefault(train_length, metrics["val"]["loss"])
    source_cache.setdefault((source, train_length), metrics["xatl"]["source_val_loss"])
    for L, loss in cached.get("source", {}).items():
        source_cache.setdefault((source, int(L)), loss)
    for L in lengths:
        if L not in losses:
            losses[L] = score(str(run / "model"), source, data, L)
        if (source, L) not in source_cache:
            source_cache[(source, L)] = score(source, source, data, L)
        cache_file.write_text(json.dumps({"loss": losses, "source": {k: source_cache[(source, k)] for k in losses
                                                                     if (source, k) in source_cache}}, indent=2) + "\n")
    return {"run": str(run), "seed": _seed(run), "mixer": metrics["xatl"]["mixer"],
            "attn_layers": metrics["xatl"]["attn_layers"], "train_length": train_length,
            "loss": {L: losses[L] for L in lengths}, "source": {L: source_cache[(source, L)] for L in lengths}}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(rows: list[dict], lengths: list[int]) -> dict:
    gaps = {L: _stats([r["loss"][L] - r["source"][L] for r in rows]) for L in lengths}
    return {"runs": rows, "mixer": rows[0]["mixer"], "train_length": rows[0]["train_length"],
            "attn_layers": [r["attn_layers"] for r in rows], "source": rows[0]["source"], "gap": gaps}


def _pm(s: dict) -> str:
    return f"{s['mean']:+.3f}" + (f" ± {s['std']:.3f}" if s["n"] > 1 else "") + f" (n={s['n']})"


def table(results: dict, lengths: list[int]) -> str:
    head = ("| run set | mixer | trained at | source at " + " / ".join(map(str, lengths)) + " | "
            + " | ".join(f"gap at {L}" for L in lengths) + " |")
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(lengths)]
    for name, r in results.items():
        cells = [(f"**{_pm(r['gap'][L])}**" if L == r["train_length"] else _pm(r["gap"][L])) for L in lengths]
        source = " / ".join(f"{r['source'][L]:.3f}" for L in lengths)
        lines.append(f"| {name} | {r['mixer']} | {r['train_length']} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in results.items():
        means, sds = [r["gap"][L]["mean"] for L in lengths], [r["gap"][L]["std"] for L in lengths]
        ax.errorbar(lengths, means, yerr=sds, marker="o", capsize=3, label=f"{name} (trained at {r['train_length']})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("context length (tokens per evaluated block)")
    ax.set_ylabel("loss − source's loss (nats/token)")
    ax.set_title("XATL models vs their source (mean ± sd over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR of finished XATL runs (repeat a NAME for its seeds)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--note", default="", help="a paragraph for OUT.md, above the table")
    args = p.parse_args(argv)
    lengths, source_cache = sorted(args.lengths), {}
    results = {name: summarize([run_losses(r, lengths, source_cache) for r in runs], lengths)
               for name, runs in _pairs(args.runs, "run").items()}
    md = table(results, lengths)
    print(md)
    machine = machine_info()
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "lengths": lengths, "results": results},
                                                        indent=2) + "\n")
    head = (f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; "
            f"{machine.get('date', '')}. Whole validation split, each length L as `surgery eval --block-size L`; "
            "gap = model − source, mean ± sd over seeds; bold: at the training length.")
    args.out.with_suffix(".md").write_text("\n\n".join(filter(None, [head, args.note.strip(), md])) + "\n")
    plot(results, lengths, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
