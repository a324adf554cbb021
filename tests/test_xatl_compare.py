"""The comparison's arithmetic: steps to reach the scratch run's final validation loss."""

import json

from surgery.xatl.compare import plot, steps_to_match, summarize, val_curve


def test_steps_to_match_and_summary(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,4,5.0,\n0,9,,4.5\n0,19,,4.0\n0,29,,3.5\n")
    xatl = val_curve(tmp_path)
    assert xatl == [(10, 4.5), (20, 4.0), (30, 3.5)]
    scratch = [(10, 6.0), (20, 4.8), (30, 4.1)]
    assert steps_to_match(xatl, 4.1) == 20 and steps_to_match(xatl, 3.0) is None
    summary = summarize(xatl, scratch, 30)
    assert summary["steps_to_match_scratch_final_loss"] == 20
    assert summary["steps_to_match_ratio"] == 20 / 30 and summary["scratch_final_val_loss"] == 4.1
    json.dumps(summary)
    plot(xatl, scratch, summary, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_val_curve_joins_the_logs_of_a_resumed_run(tmp_path):
    """A resumed arm keeps its earlier log as metrics-<n>.csv; steps logged again after the resume win."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics-1.csv").write_text("epoch,step,val/loss\n0,9,5.0\n0,19,4.5\n0,29,4.4\n")
    (logs / "metrics.csv").write_text("epoch,step,val/loss\n0,29,4.3\n0,39,4.1\n")
    assert val_curve(tmp_path) == [(10, 5.0), (20, 4.5), (30, 4.3), (40, 4.1)]
