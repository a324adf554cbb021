"""End-of-run results of a shared-depth run: gap to the original, unique parameters, the vanilla expansion's check."""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.share.build import expand, unique_parameters
from surgery.training.report import Row, count_row, gap_rows, gaps, num, print_results


@torch.no_grad()
def expansion_check(model, vanilla, blocks, n_blocks: int = 4) -> float:
    """Max |logit difference| between the shared model and its vanilla expansion on `n_blocks` validation blocks."""
    batch = torch.stack([blocks[i] for i in range(min(n_blocks, len(blocks)))])
    was = model.training
    model.eval()
    diff = (model(batch).logits.float() - vanilla(batch).logits.float()).abs().max().item()
    model.train(was)
    return diff


def share_report(module, val: dict, run_dir: str) -> dict:
    """The `share` section of metrics.json, printed as a table (`result_rows`)."""
    dm = module.trainer.datamodule
    original = module.original.model
    s = module.share
    result = {"original_val_loss": module.original_val["loss"], "original_val_tokens": module.original_val.get("tokens"),
              **gaps(val["loss"], module.original_val["loss"]),
              "unique_params": unique_parameters(module.model), "original_params": unique_parameters(original),
              "blocks": list(module.model.config.share_blocks), "init": s.init, "norms": s.norms,
              "relax_rank": s.relax_rank, "moe_experts": s.moe_experts, "moe_top_k": s.moe_top_k,
              "losses": module.distill.describe()}
    if not s.moe_experts:
        vanilla = expand(module.model)
        out = Path(run_dir) / "model-expanded"
        vanilla.save_pretrained(out)
        if module.tokenizer is not None:
            module.tokenizer.save_pretrained(out)
        result["expanded"] = str(out)
        result["expanded_logit_diff"] = expansion_check(module.model, vanilla, dm.split("validation"))
    metrics = {"share": result, "val": val}
    print_results("Shared depth: results", result_rows(metrics), caption=f"training loss: {result['losses']}")
    return {"share": result}


def result_rows(metrics: dict) -> list[Row]:
    """The shared-depth rows of the end-of-run table and the model card, from metrics.json."""
    s, val = metrics["share"], metrics.get("val") or {}
    rows = gap_rows(s, "shared", "original")
    rows.append(("validation loss, original (nats/token)", num(s["original_val_loss"])))
    if "loss" in val:
        rows.append(("validation loss, shared (nats/token)", num(val["loss"])))
    rows += count_row({"original": s.get("original_val_tokens"), "shared": val.get("tokens")})
    share = s["unique_params"] / s["original_params"]
    rows.append(("unique parameters, shared / original", f"{num(s['unique_params'])} / {num(s['original_params'])} ({share:.0%})"))
    k = max(s["blocks"]) + 1
    rows.append(("layers -> blocks", f"{len(s['blocks'])} layers read {k} blocks: {s['blocks']} (init {s['init']})"))
    rows.append(("norms / relaxation rank / experts", f"{s['norms']} / {s['relax_rank']} / {s['moe_experts'] or 'none'}"))
    if "expanded_logit_diff" in s:
        rows.append(("vanilla expansion: max |logit diff|", num(s["expanded_logit_diff"])))
    return rows
