"""Plots of a removal run: training loss with removal events, and sigma per LayerNorm."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(history: dict, removed: list[tuple[int, str]], out_dir: Path) -> list[str]:
    """Writes loss.png and sigma.png into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = history["step"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(steps, history["loss"], lw=0.8, color="k", label="training loss")
    colors = {"ln_2": "tab:blue", "ln_1_qk": "tab:orange", "ln_1_v": "tab:green", "ln_f": "tab:red"}
    for step, point in removed:
        kind = point.split(".")[-1]
        ax.axvline(step, color=colors.get(kind, "grey"), alpha=0.5, lw=0.8)
    for kind, c in colors.items():
        ax.plot([], [], color=c, label=f"{kind} removed")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="Training loss and LayerNorm removals")
    ax.legend(fontsize=8)
    loss_png = out_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    for name in history:
        if name in ("step", "loss"):
            continue
        kind = name.split(".")[-1]
        ax.plot(steps, history[name], lw=0.8, color=colors.get(kind, "grey"), alpha=0.8)
    for kind, c in colors.items():
        ax.plot([], [], color=c, label=kind)
    ax.set(xlabel="optimizer step", ylabel="sigma (moving average while real, frozen once fake)", yscale="log",
           title="sigma per LayerNorm")
    ax.legend(fontsize=8)
    sigma_png = out_dir / "sigma.png"
    fig.tight_layout()
    fig.savefig(sigma_png, dpi=120)
    plt.close(fig)
    return [str(loss_png), str(sigma_png)]
