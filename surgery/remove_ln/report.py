"""End-of-run results of a removal run: the losses table, the export check and the plots."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from surgery.eval.loss import cross_entropy
from surgery.remove_ln.points import token_context


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


def removal_report(module, exported, val: dict, run_dir: str) -> dict:
    dm = module.trainer.datamodule
    blocks = dm.split("validation")
    rows = {"original": module.original_val["loss"]}
    if module.control is not None:
        rows["control (LN kept)"] = cross_entropy(module.control, blocks, dm.batch_size)["loss"]
    label = "LN-free" if module.removal is not None else "fine-tuned (LN kept)"
    rows[label] = val["loss"]
    result = {"val_loss": rows, "losses": module.distill.describe()}
    result.update(gaps(rows))
    if module.removal is not None:
        result["export_logit_diff"] = max_logit_diff(module.model, exported, blocks, dm.tokenizer.eos_token_id, module.points)
        result["removed"] = [{"step": s, "point": p, "sigma": float(module.points[p].sigma)} for s, p in module.removal.removed]
        from surgery.remove_ln.plots import plot_run

        result["plots"] = plot_run(module.removal.history, module.removal.removed, Path(run_dir))
    print_table(result)
    return result


def gaps(rows: dict) -> dict:
    """LN-free minus original, minus control, and minus the better of the two (the bracket gap of
    Baroni et al. 2025: a fine-tune can end above the model it started from, and then the control alone
    hides that cost). Only the gaps whose losses are in `rows`."""
    if "LN-free" not in rows:
        return {}
    out = {"gap_vs_original": rows["LN-free"] - rows["original"]}
    if "control (LN kept)" in rows:
        out["gap_vs_control"] = rows["LN-free"] - rows["control (LN kept)"]
    out["gap_vs_best"] = rows["LN-free"] - min(rows["original"], rows.get("control (LN kept)", rows["original"]))
    return out


def print_table(result: dict) -> None:
    table = Table(title="LayerNorm removal: validation cross-entropy (nats/token)",
                  caption=f"training loss: {result['losses']}" if "losses" in result else None)
    table.add_column("model")
    table.add_column("val loss", justify="right")
    for name, loss in result["val_loss"].items():
        table.add_row(name, f"{loss:.4f}")
    for key, label in (("gap_vs_original", "original"), ("gap_vs_control", "control"),
                       ("gap_vs_best", "min(original, control)")):
        if key in result:
            table.add_row(f"gap (LN-free - {label})", f"{result[key]:+.4f}")
    if "export_logit_diff" in result:
        d = result["export_logit_diff"]
        table.add_row("max |logit diff| trained vs export", f"{d['max_abs']:.2e} ({d['relative']:.1e} rel.)")
    Console().print(table)
