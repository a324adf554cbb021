"""Distillation training step vs the plain next-token step, timed interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.distill_cost [--model tiny-gpt2-stdlib] [--batch 8] [--seq 256] [--repeats 20]

Every side runs a full step on the same batch: forward, loss, backward, gradient clipping (1.0), AdamW step.
- plain: `model(batch, labels=batch).loss`;
- quickstart: `surgery.training.distill.Distiller` with the LN-removal quick start's losses (0.5 x CE + 1 x KL to the
  frozen original, which runs its own forward under no_grad);
- kl+hidden: 1 x KL + 1 x normalized MSE of every block's output residual stream;
- with --twin, also the LN-removal quick start's step as a whole: a student and its control twin, each a
  full step, with the LM loss (plain+twin) or the quick start's losses and one teacher forward shared by
  both (quickstart+twin); its ratio is the cost `surgery fit` pays for distillation.
Ratio = median over rounds of t_side / t_plain from the same round (benchmarks/measure.py), on the wall clock
and, on a CPU, on the calling thread's CPU clock (other processes' time left out). Peak memory:
resident memory added during one step on CPU (PeakRSS), `torch.cuda.max_memory_allocated` on a GPU.
Prints a table and writes <out>/distill_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmarks.measure import interleaved, machine_info, paired_ratio
from benchmarks.removal_cost import build_model
from surgery.training.distill import DistillConfig, Distiller

TARGET = 1.4
SIDES = {
    "quickstart": DistillConfig(lm_weight=0.5, kl_weight=1.0),
    "kl+hidden": DistillConfig(lm_weight=0.0, kl_weight=1.0, hidden_weight=1.0),
}


class TwinStep:
    """A student and its control twin, each one full step on the same batch; with `distiller`, the
    teacher runs once and both reuse its output (as `LNRemoval.training_step` does)."""

    def __init__(self, model, ids: torch.Tensor, distiller: Distiller | None = None):
        self.student, self.control = Step(model, ids, distiller), Step(copy.deepcopy(model), ids, distiller)
        self.ids, self.distiller = ids, distiller

    def __call__(self) -> float:
        teacher_out = self.distiller.teacher(self.ids) if self.distiller is not None else None
        total = 0.0
        for step in (self.student, self.control):
            step.opt.zero_grad(set_to_none=True)
            if self.distiller is None:
                loss = step.model(self.ids, labels=self.ids).loss
            else:
                loss = self.distiller(step.model, self.ids, teacher_out=teacher_out).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(step.model.parameters(), 1.0)
            step.opt.step()
            total += float(loss.detach())
        return total


class Step:
    """One full training step of `model` on `ids`; with `distiller`, its loss instead of the plain CE."""

    def __init__(self, model, ids: torch.Tensor, distiller: Distiller | None = None):
        self.model, self.ids, self.distiller = model.train(), ids, distiller
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.distiller is None:
            loss = self.model(self.ids, labels=self.ids).loss
        else:
            loss = self.distiller(self.model, self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if self.ids.is_cuda:
            torch.cuda.synchronize()
        return float(loss.detach())


def gpu_peaks(steps: dict, rounds: int = 2) -> dict[str, float]:
    peaks = {}
    for name, fn in steps.items():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(rounds):
            fn()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return peaks


def run(model_name: str, batch: int, seq: int, repeats: int, device: str = "cpu", twin: bool = False) -> dict:
    original = build_model(model_name).to(device)
    cfg = original.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    # Each side trains its own copy of the original against its own frozen teacher copy.
    steps = {"plain": Step(copy.deepcopy(original), ids)}
    for name, config in SIDES.items():
        steps[name] = Step(copy.deepcopy(original), ids, Distiller(config, copy.deepcopy(original)))
    if twin:
        steps["plain+twin"] = TwinStep(copy.deepcopy(original), ids)
        steps["quickstart+twin"] = TwinStep(copy.deepcopy(original), ids, Distiller(SIDES["quickstart"], copy.deepcopy(original)))
    times = interleaved(steps, repeats, warmup=2, memory=device == "cpu")
    peaks = gpu_peaks(steps) if device != "cpu" else {n: times[n]["peak_mib"] for n in steps}
    tokens = batch * seq
    rows = []
    for name in steps:
        base = "plain+twin" if name.endswith("+twin") else "plain"
        losses = "CE" if name.startswith("plain") else SIDES[name.removesuffix("+twin")].describe()
        rows.append({"step": name, "losses": losses, "baseline": base,
                     "median_ms": 1000 * times[name]["median_s"], "tokens_per_s": tokens / times[name]["median_s"],
                     "ratio": 1.0 if name == base else paired_ratio(times, name, base),
                     "ratio_cpu": 1.0 if name == base else paired_ratio(times, name, base, "cpu_times"), "peak_mib": peaks[name],
                     "times_s": times[name]["times"], "cpu_times_s": times[name]["cpu_times"]})
    return {"model": model_name, "params": sum(p.numel() for p in original.parameters()), "batch": batch, "seq": seq,
            "device": device, "repeats": repeats, "target_ratio": TARGET, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['model']} ({result['params'] / 1e6:.2f}M params), batch {result['batch']} x {result['seq']} tokens, "
             f"{result['device']}, {result['repeats']} interleaved rounds",
             "", "| step | losses | median ms | tokens/s | ratio to its baseline (paired median) | ratio, thread CPU time "
             "| peak MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        cpu = "-" if r.get("ratio_cpu") is None or result["device"] != "cpu" else f"{r['ratio_cpu']:.2f}x"
        lines.append(f"| {r['step']} | {r['losses']} | {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.2f}x | {cpu} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2-stdlib", help="tiny-gpt2-stdlib, gpt2-small (random) or a path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--twin", action="store_true", help="also time the quick start's student + control step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    result = run(args.model, args.batch, args.seq, args.repeats, args.device, args.twin)
    result["machine"] = {"start": machine, "end": machine_info()}
    print(table(result))
    worst = max(r["ratio"] for r in result["rows"])
    print(f"\nslowest distillation step: {worst:.2f}x its plain baseline (target <= {TARGET}x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'distill_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
