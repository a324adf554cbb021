"""Training speed on CPU, in one process, interleaved, as ratios against a baseline timed in the same rounds.

    OMP_NUM_THREADS=1 python -m benchmarks.training_speed [--sections loss teacher compile] [--out benchmarks/training_speed]

- loss: the next-token loss at GPT-2's vocabulary (50,257; a random head of width 768, --loss-tokens positions),
  forward and backward, CE alone and CE + KL to a live teacher (`DistillConfig` quick-start weights): the plain
  full-logits computation (`chunk_size` 0, as every module trained before) vs the chunked loss. Peak memory added
  during one call (`benchmarks.measure.PeakRSS`), time ratio, and the relative difference of the losses.
- teacher: one full training step (forward, loss, backward, clipping 1.0, AdamW) of the shipped tiny GPT-2 on a
  quick-start batch (8 x 256 from the stdlib corpus): plain (CE) vs distilled from the cached top-k teacher
  (k = 32 and 128, the cache lookup included) vs the live teacher, both with the quick start's 0.5 x CE + 1 x KL.
- compile: the same full step with its forwards and losses eager vs `torch.compile`d (compiled once, before timing):
  plain CE on the tiny GPT-2, the removal quick start's step (control twin, live teacher, half the norms fake) and a
  hybrid's distill step (retention mixers).
Ratios are medians over rounds of t / t_baseline on the calling thread's CPU clock (other processes' time left out);
wall-clock ratios are recorded too. Writes OUT.json and OUT.md; the sections not run keep their earlier record there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.measure import interleaved, machine_info, paired_ratio
from surgery.training.chunked_loss import LiveTeacher, chunked_lm_losses
from surgery.training.distill import DistillConfig, Distiller, kl_to_teacher, next_token_ce

CKPT = "checkpoints/tiny-gpt2-stdlib"
QUICKSTART = dict(lm_weight=0.5, kl_weight=1.0)


def loss_section(tokens: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    V, d, T = 50257, 768, 1024
    B = max(1, tokens // T)
    h = (torch.randn(B, T, d, generator=g)).requires_grad_()
    W = (0.05 * torch.randn(V, d, generator=g)).requires_grad_()
    ht, Wt = torch.randn(B, T, d, generator=g), 0.05 * torch.randn(V, d, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    losses = {}

    def full(kl: bool):
        def fn():
            z = h @ W.t()
            log_probs = torch.log_softmax(z.float(), -1)
            loss = next_token_ce(z, ids, log_probs)
            if kl:
                loss = 0.5 * loss + kl_to_teacher(z, ht @ Wt.t(), 1.0, log_probs)
            loss.backward()
            h.grad = W.grad = None
            losses[f"full{'+kl' if kl else ''}"] = float(loss.detach())
        return fn

    def chunked(kl: bool):
        def fn():
            loss = chunked_lm_losses(h, W, ids, LiveTeacher(ht, Wt) if kl else None, 0.5 if kl else 1.0, 1.0 if kl else 0.0)[0]
            loss.backward()
            h.grad = W.grad = None
            losses[f"chunked{'+kl' if kl else ''}"] = float(loss)
        return fn

    with torch.no_grad():  # the exact losses, in float64
        z, zt = (h.double() @ W.double().t()), (ht.double() @ Wt.double().t())
        ce64 = torch.nn.functional.cross_entropy(z[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        t = torch.log_softmax(zt, -1)
        kl64 = (t.exp() * (t - torch.log_softmax(z, -1))).sum(-1).mean()
        exact = {"full": float(ce64), "full+kl": float(0.5 * ce64 + kl64)}
        del z, zt, t
    steps = {"full": full(False), "chunked": chunked(False), "full+kl": full(True), "chunked+kl": chunked(True)}
    times = interleaved(steps, repeats)
    rows = {}
    for name in steps:
        base = name.replace("chunked", "full")
        rows[name] = {"peak_mib": times[name]["peak_mib"], "cpu_ratio": paired_ratio(times, name, base, "cpu_times"),
                      "wall_ratio": paired_ratio(times, name, base), "loss": losses[name], "loss_fp64": exact[base],
                      "rel_err_vs_fp64": abs(losses[name] - exact[base]) / abs(exact[base]),
                      "rel_diff_vs_full": abs(losses[name] - losses[base]) / abs(losses[base])}
    return {"vocab": V, "width": d, "tokens": B * T, "fp32_logits_mib": B * T * V * 4 / 2**20, "rows": rows}


class Step:
    """One full training step: `losses(ids)` -> loss, backward, clip to 1.0, AdamW."""

    def __init__(self, params, losses, ids):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.losses, self.ids = losses, ids

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.losses(self.ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return float(loss.detach())


def quickstart_batch(batch: int = 8) -> tuple[torch.Tensor, object]:
    from surgery.data import TokenBlocks

    dm = TokenBlocks("stdlib", CKPT, 256, batch)
    train = dm.split("train")
    return torch.stack([train[i] for i in range(batch)]), train


def teacher_section(repeats: int) -> dict:
    import copy

    from surgery.models.loading import load_causal_lm
    from surgery.training.distill import lm_cross_entropy

    ids, train = quickstart_batch()
    base = load_causal_lm(CKPT).train()
    teacher = copy.deepcopy(base)
    live = Distiller(DistillConfig(**QUICKSTART), teacher)
    models = {name: copy.deepcopy(base) for name in ("plain", "cached top-32", "cached top-128", "live")}
    steps = {"plain": Step(models["plain"].parameters(), lambda x: lm_cross_entropy(models["plain"], x), ids)}
    for k in (32, 128):
        cached = Distiller(DistillConfig(**QUICKSTART, teacher_top_k=k), teacher)
        cached.attach_cache(train.tokens, train.block_size)
        cached.cache.targets(ids, cached._teacher_log_probs)  # fill this batch's blocks once, as a built cache holds them
        model = models[f"cached top-{k}"]
        steps[f"cached top-{k}"] = Step(model.parameters(), lambda x, c=cached, m=model: c(m, x).loss, ids)
    steps["live"] = Step(models["live"].parameters(), lambda x: live(models["live"], x).loss, ids)
    return ratios(interleaved(steps, repeats, memory=False), "plain")


class Tokenizer:
    """What the modules read of a tokenizer: its length and end-of-text id (the tiny checkpoints' own)."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 4096


def compile_section(repeats: int) -> dict:
    from surgery.remove_ln.module import LNRemoval
    from surgery.remove_ln.points import token_context
    from surgery.training.lm import CausalLM
    from surgery.xatl.training.module import XatlLM

    ids, _ = quickstart_batch()
    cases = {}
    for compiled in (False, True):
        tag = "compiled" if compiled else "eager"
        plain = CausalLM(CKPT, tokenizer=Tokenizer()).train()
        cases[f"plain, {tag}"] = (plain.parameters(), plain.lm_loss, compiled)
        removal = LNRemoval(CKPT, control=True, distill=DistillConfig(**QUICKSTART), tokenizer=Tokenizer()).train()
        context = token_context(removal.points)
        context.eot_mask = ids == 0
        with torch.no_grad():
            removal.model(ids)
        for name in list(removal.points)[: len(removal.points) // 2]:
            removal.points[name].go_fake()

        def removal_loss(x, removal=removal, context=context, compiled=compiled):
            context.eot_mask = x == 0
            fn = removal.__dict__.setdefault("_bench_fn", torch.compile(removal.step_losses) if compiled else removal.step_losses)
            loss = fn(x, None)["loss"]
            context.flush()
            return loss
        cases[f"removal quick start, {tag}"] = (removal.parameters(), removal_loss, False)
        hybrid = XatlLM(CKPT, mixer="retention", distill=DistillConfig(**QUICKSTART), tokenizer=Tokenizer()).train()
        cases[f"hybrid distill (retention), {tag}"] = (hybrid.parameters(), lambda x, m=hybrid: m.step_losses(x, True)["loss"], compiled)
    steps = {name: Step(params, torch.compile(fn) if compile_it else fn, ids) for name, (params, fn, compile_it) in cases.items()}
    first = {}
    for name, step in steps.items():  # compile (or warm up) before timing
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
        print(f"{name}: first step {first[name]:.1f} s", flush=True)
    times = interleaved(steps, repeats, memory=False)
    return {name: {**ratios({name: times[name], "base": times[name.replace("compiled", "eager")]}, "base")[name],
                   "first_step_s": first[name]} for name in steps if "compiled" in name}


def ratios(times: dict, base: str) -> dict:
    return {name: {"cpu_ratio": paired_ratio(times, name, base, "cpu_times"), "wall_ratio": paired_ratio(times, name, base),
                   "median_cpu_ms": 1e3 * times[name]["median_cpu_s"]} for name in times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["loss", "teacher", "compile"], choices=["loss", "teacher", "compile"])
    parser.add_argument("--loss-tokens", type=int, default=1024, help="positions of the loss section (multiples of 1,024)")
    parser.add_argument("--loss-repeats", type=int, default=3, help="interleaved rounds of the loss section")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/training_speed"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    earlier = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
    record = {**earlier, "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}  # sections not rerun stay
    if "loss" in args.sections:
        record["loss"] = loss_section(args.loss_tokens, args.loss_repeats)
    if "teacher" in args.sections:
        record["teacher"] = teacher_section(args.repeats)
    if "compile" in args.sections:
        record["compile"] = compile_section(args.repeats)
    md = table(record)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n")


def table(record: dict) -> str:
    lines = [f"{record['machine']['cpu']}, {record['date']}, torch {record['machine']['torch']}, 1 thread", ""]
    if "loss" in record:
        r = record["loss"]
        lines += [f"Loss at vocabulary {r['vocab']:,}, {r['tokens']:,} positions (fp32 logits {r['fp32_logits_mib']:.0f} MiB), "
                  "forward + backward:", "", "| loss | peak MiB | peak vs full | CPU time vs full | rel. error vs fp64 | rel. diff vs full |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in r["rows"].items():
            full = r["rows"][name.replace("chunked", "full")]["peak_mib"]
            lines.append(f"| {name} | {row['peak_mib']:.0f} | {row['peak_mib'] / full:.3f} | {row['cpu_ratio']:.2f} | "
                         f"{row['rel_err_vs_fp64']:.1e} | {row['rel_diff_vs_full']:.1e} |")
        lines.append("")
    for section, title in (("teacher", "Full training step, tiny GPT-2, 8 x 256, vs plain CE"),
                           ("compile", "Full training step, compiled vs eager")):
        if section in record:
            first = section == "compile"  # the compiled step's first call: compilation, wall seconds
            lines += [f"{title}:", "", "| step | CPU time ratio | wall ratio | median CPU ms |" + " first step s |" * first,
                      "|---|---:|---:|---:|" + "---:|" * first]
            for name, row in record[section].items():
                lines.append(f"| {name} | {row['cpu_ratio']:.2f} | {row['wall_ratio']:.2f} | {row['median_cpu_ms']:.0f} |"
                             + (f" {row['first_step_s']:.0f} |" if first else ""))
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
