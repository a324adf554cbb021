"""benchmarks/share_depth: per-arm statistics and the individual-vs-shared-norms difference paired by seed."""

from __future__ import annotations

import json

import pytest

from benchmarks import share_depth


def _run(root, arm, seed, gap, params=1000):
    run = root / "gpt2" / arm / f"s{seed}"
    run.mkdir(parents=True)
    share = {"original_val_loss": 3.7, "gap_vs_original": gap, "unique_params": params, "original_params": 2000}
    (run / "metrics.json").write_text(json.dumps({"share": share, "val": {"loss": 3.7 + gap}, "train_time_s": 1.0}))
    return run


def test_arm_statistics_and_the_paired_norm_ablation(tmp_path):
    ind = [_run(tmp_path, "K2", s, g) for s, g in ((0, 0.30), (1, 0.40))]
    shared = [_run(tmp_path, "K2-shared-norms", s, g) for s, g in ((1, 0.43), (0, 0.31))]  # listed out of order
    results = {("gpt2", "K2"): share_depth.summarize(ind), ("gpt2", "K2-shared-norms"): share_depth.summarize(shared)}
    assert results[("gpt2", "K2")]["gap"]["mean"] == pytest.approx(0.35)
    assert results[("gpt2", "K2")]["gap"]["std"] == pytest.approx(0.0707107, rel=1e-5)  # sample sd
    ablation = share_depth.norms_ablation(results)["gpt2"]
    assert sorted(ablation["differences"]) == pytest.approx([0.01, 0.03])  # seed 0: 0.31-0.30, seed 1: 0.43-0.40
    assert ablation["mean"] == pytest.approx(0.02)
    table = share_depth.table(results, {})
    assert "| gpt2 | 2 | +0.0200 ± 0.0141 |" in table and "1,000 (50%)" in table


def test_an_earlier_record_stands_in_only_for_pairs_with_no_finished_run(tmp_path):
    _run(tmp_path, "K2", 0, 0.30)
    kept = {"gpt2/K2": {"gap": {"mean": 9.0}}, "gpt2/K1": {"gap": {"mean": 0.7}}, "pythia/K2": {"gap": {"mean": 0.5}}}
    results = share_depth.collect(["gpt2"], ["K2", "K1", "K2-r4"], [0], tmp_path, train=False, kept=kept)
    assert results[("gpt2", "K2")]["gap"]["mean"] == pytest.approx(0.30)  # the run here, not the record's 9.0
    assert results[("gpt2", "K1")] == kept["gpt2/K1"]
    assert ("gpt2", "K2-r4") not in results and ("pythia", "K2") not in results  # neither run nor asked for
