"""End-of-run results, shared by every surgery: the gaps between the trained model and the models it is judged
against, always in one order, the number of evaluated tokens behind each figure, number formatting, and the table
printed when `surgery fit` ends.

Each surgery turns its own `metrics.json` section into (measurement, value) rows with these helpers
(`surgery.remove_ln.report.result_rows`, `surgery.xatl.training.report.result_rows`,
`surgery.ln_tune.lm.result_rows`, `surgery.ln_tune.classify.result_rows`); the same rows are printed at the end of the
run and make the results table of the model card (`surgery.publish.card`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Row = tuple[str, str]


def num(value) -> str:
    """4 decimals for losses and ratios, scientific notation for small errors, thousands separators for counts."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.2e}" if abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def signed(value: float) -> str:
    """A loss difference in nats/token: +0.0499."""
    return f"{value:+.4f}"


def gaps(model: float, original: float, control: float | None = None) -> dict[str, float]:
    """`model` minus `original`, minus `control`, and minus the better (lower) of the two: the bracket gap of
    Baroni et al. 2025. A fine-tuned control can end above the model it started from; the gap to the control
    alone then hides that cost. Keys: gap_vs_original, gap_vs_control (with a control), gap_vs_best."""
    out = {"gap_vs_original": model - original}
    if control is not None:
        out["gap_vs_control"] = model - control
    out["gap_vs_best"] = model - min(original, original if control is None else control)
    return out


def gap_rows(gap: dict, model: str, original: str, control: str | None = None, unit: str = "nats/token",
             fmt: Callable[[float], str] = signed) -> list[Row]:
    """The gap rows, in the order every results table and card uses: `model` - `original`, then the bracket gap
    `model` - min(`original`, `control`), then `model` - `control`. `gap`: keys as `gaps`; a missing key (or None)
    gives no row, and the bracket row is shown only with a control (without one it equals the first row)."""
    order = [("gap_vs_original", original)]
    if control is not None:
        order += [("gap_vs_best", f"min({original}, {control})"), ("gap_vs_control", control)]
    return [(f"gap {model} - {against} ({unit})", fmt(gap[key])) for key, against in order if gap.get(key) is not None]


def count_row(counts: dict[str, int | None], what: str = "validation tokens", of: str = "each loss") -> list[Row]:
    """One row saying how many tokens (or examples) each figure was measured on: one number when every figure
    has the same count, else each figure's own; counts not recorded (None) are named as such; no row when none is."""
    known = {name: n for name, n in counts.items() if n is not None}
    if not known:
        return []
    missing = [name for name in counts if name not in known]
    if not missing and len(set(known.values())) == 1:
        value = num(next(iter(known.values())))
    else:
        value = "; ".join(f"{name} {num(n)}" for name, n in known.items())
        value += f"; {', '.join(missing)}: not recorded" if missing else ""
    return [(f"{what} behind {of}", value)]


def print_results(title: str, rows: Iterable[Row], caption: str | None = None) -> None:
    """Print `rows` as a two-column table (rich) on stdout. Written to a file or pipe, the table is as wide as
    its longest row, so a log holds each row on one line."""
    from rich.console import Console
    from rich.table import Table

    rows = list(rows)
    table = Table(title=title, caption=caption)
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    console = Console()
    if not console.is_terminal:
        columns = [max([len(r[i]) for r in rows] + [len(("measurement", "value")[i])]) for i in (0, 1)]
        widest = max(sum(columns) + 7, len(title), len(caption or ""))  # 7: borders and padding
        console = Console(width=max(console.width, widest))
    console.print(table)
