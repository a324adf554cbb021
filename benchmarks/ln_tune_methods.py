"""LN-tuning as the papers use it, against the baselines it claims to beat, over seeds: attention-only LN-tuning
(ln-attn, Zhao et al. 2024) vs ln, lora, bitfit, full; LN-tuning with LoRA and prefix-tuning (Qi et al. 2022).

    OMP_NUM_THREADS=1 python -m benchmarks.ln_tune_methods --task sentiment --seeds 0 1 2
    OMP_NUM_THREADS=1 python -m benchmarks.ln_tune_methods --task gpt2 --seeds 0 1 2 --steps 20   # pythia, llama
    python -m benchmarks.ln_tune_methods --report                                      # the tables of every task

sentiment: all-MiniLM-L6-v2 on the VADER human-rated sentences (as benchmarks/ln_tune_sentiment.py: 2000 train /
1000 test, 1 epoch, batch 16); metric test accuracy. gpt2 | pythia | llama: the tiny stdlib checkpoints adapted to
the held-out `email` package (`--steps` steps of 8 x 248 tokens: 256 positions less prefix-tuning's 8); metric
validation loss (nats/token) on email's held-out files. All methods on gpt2 (Qi et al. used GPT-2); pythia and llama
run ln-attn's comparison (full, bitfit, lora, ln, ln-attn). Each (task, method, seed) run writes <out>/<task>/<method>-s<seed>.json and is skipped when that
exists (resumable). Cost, per task in one process, every method interleaved (benchmarks/measure.py): one training
step (forward, backward, AdamW) timed on the thread's CPU clock (ratio to full fine-tuning, same rounds), and
peak training memory = resident memory added during the step (activations, gradients; PeakRSS) + AdamW's two
moments of every trainable entry (float32). Learning rates per method below, from the usual range of each, not
tuned. Writes <out>/results.json and prints the tables; benchmarks/ln_tune_methods.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.measure import interleaved, machine_info, paired_ratio  # noqa: E402

LM_TASKS = {"gpt2": "checkpoints/tiny-gpt2-stdlib", "pythia": "checkpoints/tiny-pythia-stdlib",
            "llama": "checkpoints/tiny-llama-stdlib"}
# method: (lr, norm_lr for ln+ combinations). Sentiment rates as benchmarks/ln_tune_sentiment.py.
SENTIMENT = {"full": (1e-4, None), "bitfit": (2e-3, None), "lora": (1e-3, None), "ln": (5e-3, None),
             "ln-attn": (5e-3, None), "ln+lora": (1e-3, 5e-3), "ln+lora-mlp": (1e-3, 5e-3)}
LM = {"full": (3e-4, None), "bitfit": (3e-3, None), "lora": (2e-3, None), "ln": (3e-3, None), "ln-attn": (3e-3, None),
      "prefix": (5e-3, None), "ln+lora": (2e-3, 3e-3), "ln+prefix": (5e-3, 3e-3),
      "ln+lora-mlp": (2e-3, 3e-3)}


# Qi et al. measured the combinations on GPT-2 only: so do we (gpt2); pythia and llama run ln-attn's comparison.
LN_ATTN_ONLY = ("full", "bitfit", "lora", "ln", "ln-attn")
BLOCK = 248  # tokens per block: 256 positions less prefix-tuning's 8 virtual tokens, the same for every method


def methods_of(task: str) -> dict:
    if task == "sentiment":
        return SENTIMENT
    keep = LM if task == "gpt2" else {m: LM[m] for m in LN_ATTN_ONLY}
    return {m: v for m, v in keep.items() if not (task == "llama" and m == "bitfit")}  # Llama has no biases


def run_sentiment(method: str, seed: int, out: Path, args) -> dict:
    from surgery.ln_tune.classify import SequenceClassifier
    from surgery.ln_tune.classify_data import SentimentData

    lr, norm_lr = SENTIMENT[method]
    L.seed_everything(seed, verbose=False)
    data = SentimentData(max_train=2000, max_test=1000, batch_size=16, seed=seed)
    module = SequenceClassifier(method=method, lr=lr, norm_lr=norm_lr, seed=seed, save_model=False, save_adapter=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(out))
    trainer.fit(module, data)
    m = module.metrics
    return {"metric": m["test_accuracy"], "before": m["test_before"]["accuracy"], "trainable": m["trainable"],
            "train_s": m["train_s"]}


def run_lm(task: str, method: str, seed: int, out: Path, args) -> dict:
    from surgery.ln_tune.lm import LNTuneLM, StdlibPart
    from surgery.training.run import ExportRun

    lr, norm_lr = LM[method]
    L.seed_everything(seed, verbose=False)
    data = StdlibPart(part="email", tokenizer=LM_TASKS[task], block_size=BLOCK, batch_size=8, seed=seed)
    module = LNTuneLM(LM_TASKS[task], method=method, lr=lr, norm_lr=norm_lr, warmup_steps=max(1, args.steps // 10),
                      seed=seed, save_adapter=False)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(out), callbacks=[ExportRun()])
    start = time.perf_counter()
    trainer.fit(module, data)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metric": metrics["val"]["loss"], "before": metrics["ln_tune"]["val_before"]["loss"],
            "trainable": metrics["ln_tune"]["trainable"], "train_s": round(time.perf_counter() - start, 1),
            "val_tokens": metrics["val"]["tokens"]}


def cost(task: str, repeats: int) -> dict:
    """{method: {"step_ratio", "step_cpu_s", "peak_mib", "adam_mib"}}: one training step of each method, interleaved."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from surgery.ln_tune.classify_data import resolve_model_dir
    from surgery.ln_tune.methods import optimizer_groups, prepare

    g = torch.Generator().manual_seed(0)
    if task == "sentiment":
        batch = {"input_ids": torch.randint(1000, 20000, (16, 64), generator=g), "labels": torch.randint(0, 2, (16,))}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    else:
        ids = torch.randint(0, 4096, (8, BLOCK), generator=g)
        batch = {"input_ids": ids, "labels": ids}
    steps, trainable = {}, {}
    for method, (lr, norm_lr) in methods_of(task).items():
        if task == "sentiment":
            model = AutoModelForSequenceClassification.from_pretrained(resolve_model_dir("minilm"), num_labels=2)
        else:
            model = AutoModelForCausalLM.from_pretrained(LM_TASKS[task])
        model, _ = prepare(model, method, head="auto" if task == "sentiment" else None)
        model.train()
        opt = torch.optim.AdamW(optimizer_groups(model, lr, norm_lr), lr=lr)
        trainable[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        steps[method] = step
    times = interleaved(steps, repeats, warmup=1, memory=True)
    return {m: {"step_ratio": paired_ratio(times, m, "full", "cpu_times"), "step_cpu_s": times[m]["median_cpu_s"],
                "peak_mib": times[m]["peak_mib"], "adam_mib": 2 * 4 * trainable[m] / 2**20} for m in steps}


def summary(task: str, root: Path) -> list[dict]:
    rows = []
    for method in methods_of(task):
        runs = [json.loads(p.read_text()) for p in sorted((root / task).glob(f"{method}-s*.json"))]
        if not runs:
            continue
        vals = [r["metric"] for r in runs]
        rows.append({"method": method, "seeds": [r["seed"] for r in runs], "values": vals,
                     "mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "before": runs[0]["before"], "trainable": runs[0]["trainable"],
                     "train_s": statistics.mean(r["train_s"] for r in runs)})
    return rows


# The claims, as paired differences (same seed): Zhao et al. (ln-attn vs lora, ln), Qi et al. (a) ln+ an attention-side
# method vs each alone, (b) ln+lora-mlp vs ln; and LN-tuning's gap to full fine-tuning.
PAIRS = [("ln", "full"), ("ln-attn", "lora"), ("ln-attn", "ln"), ("ln-attn", "bitfit"), ("ln+lora", "ln"),
         ("ln+lora", "lora"), ("ln+prefix", "ln"), ("ln+prefix", "prefix"), ("ln+lora-mlp", "ln")]


def paired(task: str, rows: list[dict]) -> str:
    """Per-seed differences a - b (accuracy points, or loss nats/token: negative is better), mean ± sd."""
    by = {r["method"]: dict(zip(r["seeds"], r["values"])) for r in rows}
    scale = 100 if task == "sentiment" else 1
    lines = ["| comparison | per seed | mean ± sd |", "|---|---|---:|"]
    for a, b in PAIRS:
        if a in by and b in by and (seeds := sorted(set(by[a]) & set(by[b]))):
            d = [scale * (by[a][s] - by[b][s]) for s in seeds]
            fmt = "{:+.1f}" if scale == 100 else "{:+.4f}"
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            lines.append(f"| {a} − {b} | {', '.join(fmt.format(x) for x in d)} | {fmt.format(statistics.mean(d))} ± "
                         f"{fmt.format(sd).lstrip('+')} |")
    return "\n".join(lines)


def table(task: str, rows: list[dict], costs: dict | None) -> str:
    acc = task == "sentiment"
    head = "test accuracy %" if acc else "held-out loss (nats/token)"
    lines = [f"| method | {head} | trainable | step time vs full | peak training MiB (step + AdamW state) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        c = (costs or {}).get(r["method"])
        value = (f"{100 * r['mean']:.1f} ± {100 * r['sd']:.1f}" if acc else f"{r['mean']:.4f} ± {r['sd']:.4f}")
        mem = f"{c['peak_mib'] + c['adam_mib']:.0f} ({c['peak_mib']:.0f} + {c['adam_mib']:.1f})" if c and c["peak_mib"] is not None else "-"
        lines.append(f"| {r['method']} | {value} | {r['trainable']:,} | {c['step_ratio']:.2f}x | {mem} |" if c else
                     f"| {r['method']} | {value} | {r['trainable']:,} | - | - |")
    before = next((r["before"] for r in rows if r["method"] == "ln"), None)  # a prefix run starts elsewhere
    if before is not None:
        lines.append(f"| (before tuning, first seed) | {100 * before:.1f} |  |  |  |" if acc else
                     f"| (before tuning, first seed) | {before:.4f} |  |  |  |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["sentiment", *LM_TASKS])
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20, help="training steps of the tiny-LM tasks")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds of the cost measurement")
    parser.add_argument("--out", default="runs/ln_tune_methods")
    parser.add_argument("--report", action="store_true", help="print the tables of every measured task, write results.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = Path(args.out)
    if args.task:
        (root / args.task).mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for method in args.methods or list(methods_of(args.task)):
                path = root / args.task / f"{method}-s{seed}.json"
                if path.exists():
                    continue
                run = (run_sentiment(method, seed, root / args.task / "run", args) if args.task == "sentiment"
                       else run_lm(args.task, method, seed, root / args.task / "run", args))
                row = {"task": args.task, "method": method, "seed": seed,
                       "steps": None if args.task == "sentiment" else args.steps, **run}
                path.write_text(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
        cost_path = root / args.task / "cost.json"
        if not cost_path.exists():
            cost_path.write_text(json.dumps(cost(args.task, args.repeats), indent=1) + "\n")
    results = {"machine": machine_info(), "tasks": {}}
    text = [f"{results['machine']['cpu']}, {results['machine']['torch_threads']} thread(s), torch "
            f"{results['machine']['torch']}, transformers {results['machine']['transformers']}, "
            f"{results['machine']['date']}"]
    for task in ["sentiment", *LM_TASKS]:
        rows = summary(task, root)
        if not rows:
            continue
        costs = json.loads((root / task / "cost.json").read_text()) if (root / task / "cost.json").exists() else None
        results["tasks"][task] = {"rows": rows, "cost": costs}
        seeds = sorted({s for r in rows for s in r["seeds"]})
        text.append(f"\n### {task} (seeds {', '.join(map(str, seeds))}; mean ± sd)\n\n{table(task, rows, costs)}\n\n"
                    f"Paired differences (same seed):\n\n{paired(task, rows)}")
    print("\n".join(text))
    if args.report:
        (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (root / "results.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
