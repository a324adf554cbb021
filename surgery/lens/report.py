"""All lens checks of one model on held-out blocks, and the report of `surgery verify` (table, markdown, plots)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from surgery.lens import has_normalization
from surgery.lens.checks import attention_sink_mass, dla_check, hf_scale_spread, logit_agreement
from surgery.lens.patching import induction_prompts, patching_effects


@dataclass
class VerifySettings:
    """How much held-out data each check uses (blocks are `block_size` tokens of validation text)."""

    dla_blocks: int = 4  # blocks for HF-vs-TL logits, DLA and attention sinks
    batch_size: int = 8  # blocks per batch for cross-entropy
    seg_len: int = 32  # tokens per segment of the induction prompts (prompt = 2 * seg_len tokens)
    n_prompts: int = 16
    seed: int = 0


def verify_model(hf_model, hooked, blocks, settings: VerifySettings) -> dict:
    """Every check on one model. `blocks`: a Dataset of (block_size,) LongTensors with a flat `.tokens` array."""
    from surgery.evaluate import cross_entropy

    tokens = torch.stack([blocks[i] for i in range(min(settings.dla_blocks, len(blocks)))])
    result = {"has_normalization": has_normalization(hooked), "hf_scale_spread": hf_scale_spread(hf_model, tokens)}
    result.update(logit_agreement(hf_model, hooked, tokens))
    result.update(dla_check(hooked, tokens))
    result["attention_sink_mass"] = attention_sink_mass(hooked, tokens)
    clean, corrupted = induction_prompts(torch.from_numpy(blocks.tokens[: len(blocks) * blocks.block_size].astype("int64")),
                                         settings.seg_len, settings.n_prompts, settings.seed)
    result["patching"] = patching_effects(hooked, clean, corrupted)
    result["validation"] = cross_entropy(hf_model, blocks, settings.batch_size)
    return result


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else (f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}")
    return str(value)


def table_rows(results: dict[str, dict]) -> list[list[str]]:
    """[metric, value per model...] for the side-by-side table; `results` maps a column name to verify_model's output."""
    def row(name, get):
        return [name] + [_fmt(get(r)) for r in results.values()]

    rows = [
        row("has_normalization", lambda r: r["has_normalization"]),
        row("hf_scale_spread (per-token LN divisor)", lambda r: r["hf_scale_spread"]),
        row("hf_tl_max_abs_logit_diff", lambda r: r["hf_tl_max_abs_logit_diff"]),
        row("hf_tl_relative_logit_diff", lambda r: r["hf_tl_relative_logit_diff"]),
        row("dla_relative_error", lambda r: r["dla_relative_error"]),
        row("dla_frozen_scale_error", lambda r: r["dla_frozen_scale_error"]),
        row("dla_cached_scale_sum_error", lambda r: r["dla_cached_scale_sum_error"]),
        row("patching_correlation (attribution vs activation)", lambda r: r["patching"]["correlation"]),
        row("induction log-prob clean / corrupted", lambda r: f"{r['patching']['clean_metric']:.3f} / {r['patching']['corrupted_metric']:.3f}"),
    ]
    n_layers = max(len(r["attention_sink_mass"]) for r in results.values())
    for layer in range(n_layers):
        rows.append(row(f"attention_sink_mass L{layer}", lambda r, i=layer: r["attention_sink_mass"][i] if i < len(r["attention_sink_mass"]) else "-"))
    rows.append(row("validation cross-entropy (nats/token)", lambda r: r["validation"]["loss"]))
    return rows


def print_table(results: dict[str, dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for r in table_rows(results):
        table.add_row(*r)
    Console(width=140).print(table)


DEFINITIONS = """\
- `has_normalization`: a `hook_scale` or `hook_normalized` remains in the TransformerLens model.
- `hf_scale_spread`: (max - min) / mean over tokens of the per-token divisor at the HF model's norms, sqrt(var + eps)
  (RMSNorm: sqrt(mean(x^2) + eps)), largest over norms: ~0 when the eps trick removes the per-token scale, order 1
  for a real norm.
- `hf_tl_max_abs_logit_diff`: max |HF logits - TransformerLens logits| (fp32) on the DLA blocks.
- `dla_relative_error`: ||sum_c DE_c + f(0) - logits|| / ||logits||, DE_c = f(r) - f(r - c) the direct effect of
  component c (embeddings, each head, each b_O, each MLP) on the logits, f = final norm + unembedding. Zero up to
  float error exactly when f is affine (no per-token scale).
- `dla_frozen_scale_error`: sum_c ||DLA_c - DE_c|| / sum_c ||DE_c||, DLA_c the usual attribution with the cached
  `ln_final.hook_scale` frozen.
- `dla_cached_scale_sum_error`: ||sum_c DLA_c + const - logits|| / ||logits||: exact by construction for both models.
- `patching_correlation`: Pearson correlation over heads of attribution patching and activation patching (noising
  each head's `hook_z` with a corrupted run) on induction prompts (a held-out segment, repeated).
- `attention_sink_mass`: mean attention that queries at positions >= 1 put on position 0, per layer.
"""


def write_markdown(path: Path, results: dict[str, dict], title: str, settings: VerifySettings, block_size: int) -> None:
    names = list(results)
    lines = [f"# {title}", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    lines += ["", f"Held-out data: validation blocks of {block_size} tokens; settings: `{asdict(settings)}`.", "", DEFINITIONS]
    lines += ["Plots: `dla_error_per_layer.png`, `patching_scatter.png`.", ""]
    path.write_text("\n".join(lines))


def plot(out: Path, results: dict[str, dict]) -> list[str]:
    """DLA frozen-scale error per layer, and per-head attribution vs activation patching; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        per_layer = r["per_layer"]
        ax.plot([str(x) for x in per_layer["layer"]], [max(e, 1e-17) for e in per_layer["dla_frozen_scale_error"]], "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("layer of the component")
    ax.set_ylabel("frozen-scale DLA error (relative)")
    ax.set_title("DLA error per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dla_error_per_layer.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        p = r["patching"]
        ax.scatter(p["activation_patching"], p["attribution_patching"], s=18)
        lo = min(p["activation_patching"] + p["attribution_patching"])
        hi = max(p["activation_patching"] + p["attribution_patching"])
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("activation patching (change of mean log-prob)")
        ax.set_ylabel("attribution patching")
        ax.set_title(f"{name}: r = {_fmt(p['correlation'])}")
    fig.tight_layout()
    fig.savefig(out / "patching_scatter.png", dpi=120)
    plt.close(fig)
    return ["dla_error_per_layer.png", "patching_scatter.png"]
