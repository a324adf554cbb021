"""Markdown tables, the JSON record and the PNG of a `python -m benchmarks` run."""

from __future__ import annotations

import json
from pathlib import Path


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def removal_table(result: dict) -> str:
    """One line per phase: median step times, paired ratio (target <= 1.05), tokens/s, peak step memory."""
    lines = [f"{result['model']} ({result['params'] / 1e6:.1f}M params), batch {result['batch']} x {result['seq']} tokens",
             "", "| phase | fake LNs | plain step | removal step | ratio (median, paired) | ratio, thread CPU time "
             "| plain tok/s | removal tok/s | plain peak MiB | removal peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        flag = "" if r["ratio"] <= 1.05 else " (above 1.05)"
        cpu = r.get("ratio_cpu")
        cpu = "-" if cpu is None else f"{cpu:.3f}x" + ("" if cpu <= 1.05 else " (above 1.05)")
        lines.append(f"| {r['phase']} | {r['fake_points']}/{r['points']} | {r['plain_s'] * 1e3:.0f} ms "
                     f"| {r['removal_s'] * 1e3:.0f} ms | {r['ratio']:.3f}x{flag} | {cpu} | {r['plain_tok_s']:.0f} "
                     f"| {r['removal_tok_s']:.0f} | {_f(r['plain_peak_mib'], '.0f')} | {_f(r['removal_peak_mib'], '.0f')} |")
    for phase, p in result.get("profile", {}).items():
        lines += ["", f"Profile, {phase} (torch.profiler, self CPU time per step, mean of alternating steps: plain "
                  f"{p['plain_total_ms']:.0f} ms, removal {p['removal_total_ms']:.0f} ms); ops where removal spends more:",
                  "", "| op | first input shape | plain ms (calls) | removal ms (calls) | extra ms |", "|---|---|---|---|---|"]
        lines += [f"| {e['op']} | {e.get('shape') or '-'} | {e['base_ms']:.1f} ({e.get('base_calls', '-')}) | "
                  f"{e['other_ms']:.1f} ({e.get('other_calls', '-')}) | {e['extra_ms']:+.1f} |" for e in p["extra"]]
    return "\n".join(lines)


def export_table(result: dict) -> str:
    return ("| export_ln_free | save_pretrained | load_hooked (from disk) | size |\n|---|---|---|---|\n"
            f"| {result['export_s']:.2f} s | {result['save_s']:.2f} s | {result['load_hooked_s']:.2f} s "
            f"| {result['bytes'] / 2**20:.0f} MiB |")


def _grid(rows: list[dict], key: str, cell) -> str:
    seqs = sorted({r[key] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r[key]): r for r in rows}
    lines = ["| model | " + " | ".join(f"L={s}" for s in seqs) + " |", "|" + "---|" * (len(seqs) + 1)]
    lines += [f"| {n} | " + " | ".join(cell(by[(n, s)]) if (n, s) in by else "-" for s in seqs) + " |" for n in names]
    return "\n".join(lines)


def mixer_tables(train: list[dict], generation: list[dict]) -> str:
    """Training tokens/s (time ratio to attention), peak step memory, our mamba's speed-up over
    hf-mamba, and generation ms/token (ratio to attention)."""
    parts = ["Training tokens/s (step time / attention's, paired):", "",
             _grid(train, "seq", lambda r: f"{r['tok_s']:.0f} ({_f(r['ratio_to_attention'], '.2f')}x)"),
             "", "Peak memory added by one training step (MiB):", "",
             _grid(train, "seq", lambda r: _f(r["peak_mib"], ".0f"))]
    for name in dict.fromkeys(r["model"] for r in train if "speedup_vs_hf" in r):
        speed = [r for r in train if r["model"] == name and "speedup_vs_hf" in r]
        parts += ["", f"Our {name} vs hf-{name}, training tokens/s (target >= 3x): " +
                  ", ".join(f"L={r['seq']}: {r['speedup_vs_hf']:.1f}x" for r in speed)]
    if generation:
        parts += ["", "Generation, ms per token after an L-token prompt (median step; step time / attention's, paired):",
                  "", _grid(generation, "context",
                            lambda r: f"{r['ms_per_token']:.2f} ({_f(r['ratio_to_attention'], '.2f')}x)")]
        for name in dict.fromkeys(r["model"] for r in generation if "hf_over_ours" in r):
            gen = [r for r in generation if r["model"] == name and "hf_over_ours" in r]
            parts += ["", f"hf-{name} / our {name}, decoding step time (target >= 1): " +
                      ", ".join(f"L={r['context']}: {r['hf_over_ours']:.2f}" for r in gen)]
    return "\n".join(parts)


def recurrence_table(rows: list[dict]) -> str:
    """Ours vs flash-linear-attention's naive reference, seconds for forward + backward of one recurrence."""
    lines = ["| mixer | L | ours | fla naive | fla / ours | max abs diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        fla = "-" if r["fla_s"] is None else f"{1e3 * r['fla_s']:.1f} ms"
        lines.append(f"| {r['mixer']} | {r['seq']} | {1e3 * r['ours_s']:.1f} ms | {fla} | "
                     f"{'-' if r['fla_over_ours'] is None else format(r['fla_over_ours'], '.1f') + 'x'} | {_f(r['max_abs_diff'], '.1e')} |")
    return "\n".join(lines)


def plot(train: list[dict], generation: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    fig.suptitle("Mixers vs softmax attention on CPU (batch 1): training throughput and decoding cost by length")
    # Decoding is plotted as the paired ratio to attention: the machine's speed drifts between contexts,
    # and the ratio of steps taken moments apart is what the measurement holds steady.
    for ax, rows, key, ylab in ((axes[0], train, "tok_s", "training tokens/s"),
                                (axes[1], generation, "ratio_to_attention", "decoding step time / attention's (paired)")):
        x = "seq" if rows is train else "context"
        for name in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r[x], r[key]) for r in rows if r["model"] == name and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log" if rows is train else "linear")
        ax.set(xlabel="sequence / context length (tokens)", ylabel=ylab)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False)  # below the axes, over no line
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_line(row: dict) -> str:
    """One benchmark row as `key=value` pairs (floats to 4 significant digits; lists of timings left out)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "  ".join(f"{k}={fmt(v)}" for k, v in row.items() if not isinstance(v, (list, dict)))


def write_json(record: dict, path: Path) -> None:
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
