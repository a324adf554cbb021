"""Plots of a removal run: training loss with removal events, and sigma per LayerNorm."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


NOT_SIGMA = ("step", "loss", "control_loss")


def smooth(values: list[float], momentum: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (so the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = momentum * avg + (1 - momentum) * v
        out.append(avg / (1 - momentum ** (i + 1)))
    return out


def plot_run(history: dict, removed: list[tuple[int, str]], out_dir: Path) -> list[str]:
    """Writes loss.png and sigma.png into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = history["step"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(steps, history["loss"], lw=0.5, color="k", alpha=0.25)
    ax.plot(steps, smooth(history["loss"]), lw=1.5, color="k", label="training loss (EMA 0.9)")
    if history.get("control_loss"):
        ax.plot(steps, smooth(history["control_loss"]), lw=1.2, color="tab:purple", ls="--", label="control, LN kept (EMA 0.9)")
    colors = {"ln_2": "tab:blue", "ln_1_qk": "tab:orange", "ln_1_v": "tab:green", "ln_f": "tab:red", "ln_q": "tab:cyan",
              "ln_k": "tab:olive", "ln_attn_out": "tab:brown", "ln_mlp_out": "tab:pink"}
    present = {point.split(".")[-1] for _, point in removed}
    for step, point in removed:
        kind = point.split(".")[-1]
        ax.axvline(step, color=colors.get(kind, "grey"), alpha=0.5, lw=0.8)
    for kind, c in colors.items():
        if kind in present:
            ax.plot([], [], color=c, label=f"{kind} removed")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="Training loss and LayerNorm removals")
    ax.legend(fontsize=8)
    loss_png = out_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    # one line and one legend entry per norm: colour = kind, line style = block (cycled), legend beside the axes
    names = [n for n in history if n not in NOT_SIGMA]
    fig, ax = plt.subplots(figsize=(11, 5))
    styles = ("-", "--", ":", "-.")
    for name in names:
        kind, block = name.split(".")[-1], name.split(".")[1] if name.count(".") >= 2 else ""
        ls = styles[int(block) % len(styles)] if block.isdigit() else "-"
        ax.plot(steps, history[name], lw=0.9, color=colors.get(kind, "grey"), ls=ls, alpha=0.85, label=name)
    ax.set(xlabel="optimizer step", ylabel="sigma (moving average while real, frozen once fake)", yscale="log",
           title="sigma per LayerNorm (colour: kind, line style: block)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=max(1, -(-len(names) // 26)), frameon=False)
    sigma_png = out_dir / "sigma.png"
    fig.tight_layout()
    fig.savefig(sigma_png, dpi=120)
    plt.close(fig)
    return [str(loss_png), str(sigma_png)]
