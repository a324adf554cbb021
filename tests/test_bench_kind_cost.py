"""benchmarks.removal_kind_cost: the loss jump per point kind, summed over blocks, mean and spread over runs."""

import json
import statistics

import pytest

from benchmarks import removal_kind_cost


def _run(path, jumps: dict[str, float]):
    path.mkdir(parents=True)
    removed = [{"step": i, "point": p, "sigma": 1.0, "loss_jump": j} for i, (p, j) in enumerate(jumps.items())]
    (path / "metrics.json").write_text(json.dumps({"removed": removed}))
    return path


def test_kind_costs_sum_blocks_and_average_runs(tmp_path):
    a = _run(tmp_path / "a", {"h.0.ln_q": 0.02, "h.1.ln_q": 0.04, "h.0.ln_attn_out": 0.10, "ln_f": -0.01})
    b = _run(tmp_path / "b", {"h.0.ln_q": 0.00, "h.1.ln_q": 0.02, "h.0.ln_attn_out": 0.14, "ln_f": 0.01})
    r = removal_kind_cost.summarize([a, b])
    assert list(r) == ["ln_q", "ln_attn_out", "ln_f"]  # removal order of `KINDS`
    assert r["ln_q"]["mean"] == pytest.approx(0.04) and r["ln_q"]["per_point"] == pytest.approx(0.02)
    assert r["ln_attn_out"]["std"] == pytest.approx(statistics.stdev([0.10, 0.14]))
    assert removal_kind_cost.table({"olmo2": r}).splitlines()[2].startswith("| olmo2 | `ln_attn_out` |")


def test_a_run_without_loss_jumps_is_refused_naming_the_fix(tmp_path):
    old = _run(tmp_path / "old", {"h.0.ln_2": 0.1})
    data = json.loads((old / "metrics.json").read_text())
    del data["removed"][0]["loss_jump"]
    (old / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="has no loss_jump for \\['h.0.ln_2'\\]: rerun it with this version"):
        removal_kind_cost.summarize([old])
