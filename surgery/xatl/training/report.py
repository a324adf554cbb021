"""The XATL rows of the end-of-run table and of the model card (`surgery.training.report` prints them)."""

from __future__ import annotations

from surgery.training.report import Row, count_row, gap_rows, num


def result_rows(metrics: dict) -> list[Row]:
    """The XATL rows of the end-of-run table and the model card, from metrics.json: the gap to the source first,
    the source's and the hybrid's validation loss with the tokens behind them, the mixer, the layers that kept
    softmax attention, and whether and when the transferred weights were unfrozen."""
    x, val = metrics["xatl"], metrics.get("val") or {}
    rows = gap_rows({"gap_vs_original": x.get("gap_vs_source")}, "hybrid", "source")
    if x.get("source_val_loss") is not None:
        rows.append(("validation loss, source (nats/token)", num(x["source_val_loss"])))
    if "loss" in val:
        rows.append(("validation loss, hybrid (nats/token)", num(val["loss"])))
    rows += count_row({"source": x.get("source_val_tokens"), "hybrid": val.get("tokens")})
    rows.append(("mixer / transferred components", f"{x.get('mixer')} / {', '.join(x.get('transfer', [])) or 'none'}"))
    if "attn_layers" in x:
        kept = ", ".join(str(i) for i in x["attn_layers"]) or "none (a mixer in every block)"
        auto = x.get("attn_layer_criterion")
        rows.append(("softmax attention kept at layers", kept + (f" (auto, ranked by {auto})" if auto else "")))
    rows.append(("transferred parameters", num(x.get("transferred_params"))))
    if not x.get("transfer"):
        unfrozen = "nothing transferred (trained from scratch)"
    elif x.get("frozen_tensors") == 0:
        unfrozen = "never frozen (freeze: false)"
    else:
        unfrozen = "never: frozen as copied for the whole run" if x.get("unfrozen_at") is None else f"at step {x['unfrozen_at']}"
    rows.append(("transferred weights unfrozen", unfrozen))
    return rows
