"""All lens checks and paper analyses of one model on held-out blocks, and the report of `surgery verify` (table,
markdown, plots)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from surgery.lens import has_normalization
from surgery.lens.analyses import N_BINS, SINK_THRESHOLD, paper_analyses
from surgery.lens.checks import attention_sink_heads, attention_sink_mass, dla_check, hf_scale_spread, logit_agreement
from surgery.lens.expressivity import DEFINITIONS as EXPRESSIVITY_DEFINITIONS
from surgery.lens.expressivity import HULL_SEQUENCES, HULL_TOKENS, expressivity
from surgery.lens.patching import induction_prompts, patching_effects


@dataclass
class VerifySettings:
    """How much held-out data each check uses (blocks are `block_size` tokens of validation text)."""

    dla_blocks: int = 4  # blocks for HF-vs-TL logits, DLA and attention sinks
    batch_size: int = 8  # blocks per batch for cross-entropy
    seg_len: int = 32  # tokens per segment of the induction prompts (prompt = 2 * seg_len tokens)
    n_prompts: int = 16
    seed: int = 0
    hull_tokens: int = HULL_TOKENS  # keys per sequence in the unselectable-key LP (the first N tokens of a DLA block)
    hull_sequences: int = HULL_SEQUENCES  # DLA blocks in the unselectable-key LP


def verify_model(hf_model, hooked, blocks, settings: VerifySettings) -> dict:
    """Every check on one model. `blocks`: a Dataset of (block_size,) LongTensors with a flat `.tokens` array."""
    from surgery.eval.loss import cross_entropy

    tokens = torch.stack([blocks[i] for i in range(min(settings.dla_blocks, len(blocks)))])
    result = {"has_normalization": has_normalization(hooked), "hf_scale_spread": hf_scale_spread(hf_model, tokens)}
    result.update(logit_agreement(hf_model, hooked, tokens))
    result.update(dla_check(hooked, tokens))
    sinks = attention_sink_heads(hooked, tokens)
    result["attention_sink_mass"] = attention_sink_mass(sinks)
    clean, corrupted = induction_prompts(torch.from_numpy(blocks.tokens[: len(blocks) * blocks.block_size].astype("int64")),
                                         settings.seg_len, settings.n_prompts, settings.seed)
    result["patching"] = patching_effects(hooked, clean, corrupted)
    result["validation"] = cross_entropy(hf_model, blocks, settings.batch_size)
    result["analyses"] = paper_analyses(hf_model, sinks, blocks, tokens, settings.batch_size)
    result["expressivity"] = expressivity(hf_model, hooked, tokens, settings.hull_tokens, settings.hull_sequences)
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
    rows.append(row("cross-entropy (nats/token)", lambda r: r["validation"]["loss"]))  # on --split of --data
    a = lambda r: r["analyses"]  # noqa: E731
    rows += [
        row("output entropy (nats/token)", lambda r: a(r)["output"]["entropy"]),
        row(f"expected calibration error ({N_BINS} bins)", lambda r: a(r)["output"]["ece"]),
        row("top-1 confidence / accuracy", lambda r: f"{a(r)['output']['confidence']:.3f} / {a(r)['output']['accuracy']:.3f}"),
        row("first-position norm ratio, final layer", lambda r: a(r)["first_position_norm"]["ratio"][-1]),
        row("first-position norm ratio, max over layers", lambda r: max(a(r)["first_position_norm"]["ratio"])),
        row(f"attention-sink rate (heads > {SINK_THRESHOLD:g} on position 0)", lambda r: a(r)["attention_sink_rate"]),
        row("entropy neurons (final MLP)", lambda r: _neurons(a(r)["entropy_neurons"]["neurons"])),
        row("entropy neurons: max null-space fraction, large norm", lambda r: a(r)["entropy_neurons"]["max_null_fraction_large_norm"]),
        row("entropy neurons mean-ablated: change of loss", lambda r: a(r)["entropy_neurons"]["delta_loss"]),
        row("entropy neurons mean-ablated: change of entropy", lambda r: a(r)["entropy_neurons"]["delta_entropy"]),
    ]
    for name, key, field in EXPRESSIVITY_ROWS:
        n_layers = max(len(r["expressivity"][key][field]) for r in results.values())
        for layer in range(n_layers):
            rows.append(row(f"{name} L{layer}", lambda r, i=layer, k=key, f=field: _at(r["expressivity"][k][f], i)))
    return rows


# (row name, key under result["expressivity"], per-layer list): LayerNorm's roles in attention, Brody et al. 2023
EXPRESSIVITY_ROWS = (
    ("unselectable key share", "unselectable_keys", "per_layer"),
    ("all-ones component, block input", "all_ones_component", "block_input"),
    ("all-ones component, attention input", "all_ones_component", "attention_input"),
    ("attention entropy / uniform", "attention_entropy", "per_layer"),
)


def _at(values: list, i: int):
    return values[i] if i < len(values) else "-"


def _neurons(ids: list[int], shown: int = 5) -> str:
    listed = ", ".join(map(str, ids[:shown])) + (", ..." if len(ids) > shown else "")
    return f"{len(ids)} ({listed})" if ids else "0"


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

The LN-removal papers' analyses (Baroni et al. 2025, Stolfo et al. 2024; `surgery.lens.analyses`), on the HF model:
- `output entropy`: mean over every predicted token of the validation blocks of H(p) = -sum_v p_v log p_v of the
  next-token distribution, nats.
- `expected calibration error`: predictions binned by top-1 probability into 10 equal-width bins [b/10, (b+1)/10)
  (the last holds 1.0); ECE = sum_b (n_b / N) |acc_b - conf_b|, acc_b the share of the bin's tokens whose top-1
  prediction is the actual next token, conf_b their mean top-1 probability; same tokens as the entropy.
- `top-1 confidence / accuracy`: mean top-1 probability and top-1 accuracy over those tokens.
- `first-position norm ratio`: per layer l, mean L2 norm of the residual stream after block l at position 0,
  divided by its mean norm at positions >= 1, on the DLA blocks (position 0 is the block's first token, not a BOS).
- `attention-sink rate`: share of (layer, head) pairs whose mean attention from queries at positions >= 1 to
  position 0 exceeds 0.3, on the DLA blocks.
- `entropy neurons`: neurons of the final MLP whose output weight w_out (row of the output projection; for a
  LayerNorm family with its mean over d_model removed, as the norm removes it) has (a) a norm at or above the
  0.9 quantile of the layer's neurons AND (b) a null-space fraction ||P w_out||^2 / ||w_out||^2 >= 10 k / d.
  P projects onto the k = max(1, round(0.05 d)) right singular vectors with the smallest singular values of the
  effective unembedding W_U diag(w_final_norm), centered over the vocabulary (and, for a LayerNorm, restricted to
  the (d-1)-dimensional centered subspace, d counting its dimensions); 10 k / d is ten times a random direction's
  expected fraction. `max null-space fraction, large norm` is the largest fraction among the neurons passing (a).
- `mean-ablated`: every selected neuron's activation (the input of the output projection) set to its mean over
  all positions of the validation blocks; change = ablated - clean loss (nats/token) and mean entropy (nats),
  0 when no neuron is selected. Entropy neurons act through the final norm's per-token scale, so in an LN-free
  model their effect is expected to mostly vanish.
"""


def write_markdown(path: Path, results: dict[str, dict], title: str, settings: VerifySettings, block_size: int,
                   data: str | None = None) -> None:
    """report.md: the table, the data (`data`, in words; default "validation blocks of N tokens"), the settings and
    the definitions."""
    names = list(results)
    lines = [f"# {title}", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    data = data or f"validation blocks of {block_size} tokens"
    lines += ["", f"Data: {data}; settings: `{asdict(settings)}`.", "", DEFINITIONS, EXPRESSIVITY_DEFINITIONS]
    lines += ["Plots: `dla_error_per_layer.png`, `patching_scatter.png`, `calibration.png` (reliability diagram), "
              "`first_position_norm.png`, `entropy_neurons.png` (final-layer neurons: norm vs null-space fraction), "
              "`unselectable_keys.png`, `all_ones_component.png`, `attention_entropy.png` (per layer).", ""]
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
    _finish(fig, ax, "layer of the component", "frozen-scale DLA error (relative)", "DLA error per layer",
            out / "dla_error_per_layer.png", plt)

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
    _save(fig, out / "patching_scatter.png", plt)
    return ["dla_error_per_layer.png", "patching_scatter.png", *plot_analyses(out, results, plt),
            *plot_expressivity(out, results, plt)]


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path, plt, legend_size=None) -> None:
    """Label one-axes figure `fig`, add its legend, save it to `path` and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_analyses(out: Path, results: dict[str, dict], plt) -> list[str]:
    """Reliability diagram, first-position norm ratio per layer, and final-layer neurons by norm and null-space
    fraction (entropy neurons marked); returns file names."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for name, r in results.items():
        o = r["analyses"]["output"]
        seen = [i for i, n in enumerate(o["bins"]["count"]) if n > 0]
        ax.plot([o["bins"]["confidence"][i] for i in seen], [o["bins"]["accuracy"][i] for i in seen], "o-",
                label=f"{name}: ECE {o['ece']:.3f}, entropy {o['entropy']:.2f}")
    _finish(fig, ax, "top-1 probability (bin mean)", "top-1 accuracy", f"Reliability diagram ({N_BINS} bins)",
            out / "calibration.png", plt, legend_size=8)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ratio = r["analyses"]["first_position_norm"]["ratio"]
        ax.plot(range(len(ratio)), ratio, "o-", label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(max(len(r["analyses"]["first_position_norm"]["ratio"]) for r in results.values())))
    _finish(fig, ax, "layer (residual stream after the block)", "norm at position 0 / mean norm elsewhere",
            "First-position residual norm", out / "first_position_norm.png", plt)

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        e = r["analyses"]["entropy_neurons"]
        ax.scatter(e["null_fraction"], e["norm"], s=8, alpha=0.5)
        ax.scatter([e["null_fraction"][i] for i in e["neurons"]], [e["norm"][i] for i in e["neurons"]], s=30, c="red", label="entropy neurons")
        ax.axvline(e["null_fraction_threshold"], color="k", lw=0.8, ls="--")
        ax.axhline(e["norm_threshold"], color="k", lw=0.8, ls="--")
        ax.set_xlabel("null-space fraction of w_out")
        ax.set_ylabel("||w_out||")
        ax.set_title(f"{name}: {len(e['neurons'])} entropy neurons")
        ax.legend(fontsize=8)
    _save(fig, out / "entropy_neurons.png", plt)
    return ["calibration.png", "first_position_norm.png", "entropy_neurons.png"]


# file: (title, y label, log scale, curves: (key under result["expressivity"], per-layer list, label suffix, style))
EXPRESSIVITY_PLOTS = {
    "unselectable_keys.png": ("Keys inside the convex hull of the others", "unselectable key share", False,
                              (("unselectable_keys", "per_layer", "", "o-"),)),
    "all_ones_component.png": ("All-ones component of the attention input", "|cos(x, all-ones)|, mean over tokens", True,
                               (("all_ones_component", "block_input", ", block input", "o-"),
                                ("all_ones_component", "attention_input", ", attention input (norm without affine)", "s--"))),
    "attention_entropy.png": ("Attention entropy relative to uniform", "H(attention) / log(keys seen)", False,
                              (("attention_entropy", "per_layer", "", "o-"),)),
}


def plot_expressivity(out: Path, results: dict[str, dict], plt) -> list[str]:
    """Per-layer curves, one color per model, of the unselectable key share, the all-ones component (log scale: a
    centered input sits at float precision, ~1e-8) and the relative attention entropy; returns file names."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for file, (title, ylabel, log, curves) in EXPRESSIVITY_PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        n_layers = 0
        for color, (name, r) in zip(colors, results.items()):
            for key, field, what, style in curves:
                values = r["expressivity"][key][field]
                n_layers = max(n_layers, len(values))
                ax.plot(range(len(values)), [max(v, 1e-12) for v in values] if log else values, style, color=color,
                        label=name + what)
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(n_layers))
        _finish(fig, ax, "layer", ylabel, title, out / file, plt, legend_size=8)
    return list(EXPRESSIVITY_PLOTS)
