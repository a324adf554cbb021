"""sigma.png: one line and one legend entry per LayerNorm, the legend beside the axes (not over the lines)."""

from __future__ import annotations

import matplotlib.figure

from surgery.remove_ln.plots import plot_run
from surgery.remove_ln.points import BASE_KINDS as KINDS, point_names


def test_sigma_plot_labels_every_line(tmp_path, monkeypatch):
    names = [n for k in KINDS for n in point_names(4)[k]]
    history = {"step": [0, 1, 2], "loss": [3.0, 2.9, 2.8], **{n: [1.0 + i, 1.1 + i, 1.2 + i] for i, n in enumerate(names)}}
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    plot_run(history, [(1, names[0])], tmp_path)
    sigma = figures[1].axes[0]
    labels = [t.get_text() for t in sigma.get_legend().get_texts()]
    assert len(names) == 13 and labels == names and len(sigma.get_lines()) == 13
    assert sigma.get_legend().get_bbox_to_anchor().x0 > sigma.get_window_extent().x1  # right of the axes
