"""End-of-run results of a removal run: the results table (also the model card's), the export check and the plots."""

from __future__ import annotations

from pathlib import Path

import torch
from surgery.eval.loss import cross_entropy
from surgery.remove_ln.points import token_context
from surgery.training.report import Row, count_row, gap_rows, num, print_results
from surgery.training.report import gaps as shared_gaps


@torch.no_grad()
def max_logit_diff(trained, exported, blocks, eos_id: int | None, points=None, n_blocks: int = 4) -> dict:
    """Max |logit difference| between the trained (fake-LN) model and its export, fp32, on `n_blocks` blocks."""
    batch = torch.stack([blocks[i] for i in range(min(n_blocks, len(blocks)))])
    was = trained.training
    trained.eval()
    if points:
        token_context(points).eot_mask = batch == eos_id
    a = trained.float()(batch).logits
    b = exported.float()(batch).logits
    trained.train(was)
    diff = (a - b).abs().max().item()
    return {"max_abs": diff, "relative": diff / a.abs().max().item()}


def loss_jumps(history: dict, removed: list[tuple[int, str]]) -> dict[str, float]:
    """{point: the training loss's jump when it went (nats/token)}, from the removal callback's per-batch history.

    The steps at which removals happen, e_0 < ... < e_n, cut training into intervals [e_j, e_{j+1}); the jump at e_j is
    the mean training loss over its interval minus the mean over the one before (before e_0: as many steps as the
    first interval has; after e_n: as many as the last one before it), shared equally by the points removed at e_j.
    The jumps add up to the change from before the first removal to after the last. One batch per step is noisy:
    average over blocks, kinds and seeds (`benchmarks.removal_kind_cost`)."""
    by_step: dict[int, list[float]] = {}
    for step, loss in zip(history["step"], history["loss"]):
        by_step.setdefault(step, []).append(loss)
    events = sorted({s for s, _ in removed})
    if not events or not by_step:
        return {}
    widths = [b - a for a, b in zip(events, events[1:])] or [1]
    bounds = [events[0] - widths[0], *events, events[-1] + widths[-1]]

    def mean(lo: int, hi: int) -> float | None:
        values = [v for s in range(lo, hi) for v in by_step.get(s, [])]
        return sum(values) / len(values) if values else None

    means = [mean(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    jumps: dict[str, float] = {}
    for j, step in enumerate(events):
        points = [p for s, p in removed if s == step]
        if means[j] is not None and means[j + 1] is not None:
            jumps.update({p: (means[j + 1] - means[j]) / len(points) for p in points})
    return jumps


def _removal(step: int, point: str, sigma, jump: float | None) -> dict:
    """One removal for metrics.json: its step, point, sigma (a per-head norm's mean, and each head's) and the
    training loss's jump (`loss_jumps`)."""
    out = {"step": step, "point": point, "sigma": float(sigma.mean()), "loss_jump": jump}
    if sigma.numel() > 1:
        out["sigma_per_head"] = sigma.tolist()
    return out


def removal_report(module, exported, val: dict, run_dir: str) -> dict:
    """The removal's part of metrics.json (losses of original / control / LN-free and the tokens behind each,
    the gaps, the export check, the removed norms, the plots), printed as a table (`result_rows`) as well."""
    dm = module.trainer.datamodule
    blocks = dm.split("validation")
    rows = {"original": module.original_val["loss"]}
    tokens = {"original": module.original_val.get("tokens")}
    if module.control is not None:
        control = cross_entropy(module.control, blocks, dm.batch_size)
        rows["control (LN kept)"], tokens["control (LN kept)"] = control["loss"], control["tokens"]
    label = "LN-free" if module.removal is not None else "fine-tuned (LN kept)"
    rows[label], tokens[label] = val["loss"], val.get("tokens")
    result = {"val_loss": rows, "val_tokens": tokens, "losses": module.distill.describe()}
    result.update(gaps(rows))
    if module.removal is not None:
        result["export_logit_diff"] = max_logit_diff(module.model, exported, blocks, dm.tokenizer.eos_token_id, module.points)
        jumps = loss_jumps(module.removal.history, module.removal.removed)
        result["removed"] = [_removal(s, p, module.points[p].sigma, jumps.get(p)) for s, p in module.removal.removed]
        from surgery.remove_ln.plots import plot_run

        result["plots"] = plot_run(module.removal.history, module.removal.removed, Path(run_dir))
    print_results("LayerNorm removal: results", result_rows(result), caption=f"training loss: {result['losses']}")
    return result


def gaps(rows: dict) -> dict:
    """LN-free minus original, minus control, and minus the better of the two (the bracket gap of
    Baroni et al. 2025: a fine-tune can end above the model it started from, and then the control alone
    hides that cost). Only the gaps whose losses are in `rows`."""
    if "LN-free" not in rows:
        return {}
    return shared_gaps(rows["LN-free"], rows["original"], rows.get("control (LN kept)"))


def result_rows(metrics: dict) -> list[Row]:
    """The removal's rows of the end-of-run table and the model card, from metrics.json: the gaps first (to the
    original, the bracket gap, then to the control), the losses and the validation tokens behind them, the export
    check and the removed norms. Gaps an older metrics.json lacks are taken from its losses."""
    losses = metrics["val_loss"]
    rows = []
    if "LN-free" in losses:
        recorded = {k: metrics[k] for k in ("gap_vs_original", "gap_vs_control", "gap_vs_best") if k in metrics}
        control = "control" if "control (LN kept)" in losses else None
        rows += gap_rows({**gaps(losses), **recorded}, "LN-free", "original", control)
    rows += [(f"validation loss, {name} (nats/token)", num(v)) for name, v in losses.items()]
    tokens = metrics.get("val_tokens")
    if tokens is None:  # an older run: only the final model's count is known (`val` is its loss)
        tokens = {name: (metrics.get("val") or {}).get("tokens") if name == list(losses)[-1] else None for name in losses}
    rows += count_row(tokens)
    if "export_logit_diff" in metrics:
        d = metrics["export_logit_diff"]
        rows.append(("max abs logit diff, trained (fake LN) vs export", f"{num(d['max_abs'])} ({num(d['relative'])} relative)"))
    if metrics.get("removed"):
        last = metrics["removed"][-1]
        rows.append(("norm removal points made fake", f"{len(metrics['removed'])} (last: {last['point']} at step {last['step']})"))
    return rows
