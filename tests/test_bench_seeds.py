"""The seed aggregators of benchmarks/: means and sample spreads from finished runs' metrics.json."""

import json
import statistics

import pytest

from benchmarks import removal_seeds, xatl_seeds


def _xatl_run(path, seed, loss, source=3.5):
    (path / "logs").mkdir(parents=True)
    (path / "logs" / "config.yaml").write_text(f"seed_everything: {seed}\n")
    (path / "metrics.json").write_text(json.dumps({
        "steps": 300, "tokens_seen": 307200, "val": {"loss": loss, "tokens": 1000},
        "xatl": {"mixer": "gla", "source_val_loss": source, "gap_vs_source": loss - source, "attn_layers": []}}))
    return path


def test_xatl_seeds_gaps_and_scratch_arm_against_the_source(tmp_path):
    losses = [3.61, 3.64, 3.58]
    runs = [_xatl_run(tmp_path / f"s{i}", i, x) for i, x in enumerate(losses)]
    compare = tmp_path / "cmp"
    _xatl_run(compare / "xatl", 7, 3.66)
    _xatl_run(compare / "scratch", 7, 4.4)
    r = xatl_seeds.summarize(runs, [compare])
    assert [row["seed"] for row in r["runs"]] == [0, 1, 2, 7]
    assert r["xatl"]["mean"] == pytest.approx(statistics.fmean(losses + [3.66]))
    assert r["gap_vs_source"]["std"] == pytest.approx(statistics.stdev(losses + [3.66]))
    assert r["scratch_gap_vs_source"] == {"mean": pytest.approx(0.9), "std": 0.0, "n": 1}
    gaps = [x - 3.5 for x in losses + [3.66]]
    assert f"{statistics.fmean(gaps):+.3f} ± {statistics.stdev(gaps):.3f} (n=4)" in xatl_seeds.table({"x": r})


def test_xatl_seeds_scratch_only_leaves_the_comparisons_xatl_arm_out(tmp_path):
    runs = [_xatl_run(tmp_path / f"s{i}", i, x) for i, x in enumerate([3.6, 3.7])]
    compare = tmp_path / "cmp"
    _xatl_run(compare / "xatl", 0, 3.9)
    _xatl_run(compare / "scratch", 0, 4.4)
    r = xatl_seeds.summarize(runs, scratch_only=[compare])
    assert len(r["runs"]) == 2 and r["xatl"]["mean"] == pytest.approx(3.65)
    assert r["scratch"]["mean"] == pytest.approx(4.4)


def test_xatl_seeds_refuses_runs_against_different_sources(tmp_path):
    runs = [_xatl_run(tmp_path / "a", 0, 3.6, source=3.5), _xatl_run(tmp_path / "b", 1, 3.6, source=3.7)]
    with pytest.raises(ValueError, match="different source losses"):
        xatl_seeds.summarize(runs)


def _removal_runs(root, losses):
    runs = []
    for seed, (ctrl, free) in enumerate(losses):
        run = root / f"s{seed}"
        (run / "logs").mkdir(parents=True)
        (run / "logs" / "config.yaml").write_text(f"seed_everything: {seed}\n")
        val = {"original": 3.705, "control (LN kept)": ctrl, "LN-free": free}
        (run / "metrics.json").write_text(json.dumps({
            "val_loss": val, "gap_vs_original": free - 3.705, "gap_vs_control": free - ctrl,
            "gap_vs_best": free - min(3.705, ctrl), "export_logit_diff": {"relative": 1e-6}, "val": {"tokens": 10}}))
        runs.append(run)
    return runs


def test_removal_seeds_bracket_gap_over_seeds(tmp_path):
    runs = _removal_runs(tmp_path, [(3.70, 3.72), (3.71, 3.71), (3.69, 3.73)])
    r = removal_seeds.summarize(runs)
    gaps = [3.72 - 3.70, 3.71 - 3.705, 3.73 - 3.69]
    assert r["gap_vs_best"]["mean"] == pytest.approx(statistics.fmean(gaps))
    assert r["gap_vs_best"]["std"] == pytest.approx(statistics.stdev(gaps))


def test_removal_seeds_keeps_the_groups_of_an_earlier_record_it_does_not_rerun(tmp_path):
    a = _removal_runs(tmp_path / "a", [(3.70, 3.72), (3.71, 3.71)])
    b = _removal_runs(tmp_path / "b", [(3.60, 3.80), (3.61, 3.81)])
    removal_seeds.main([f"old={a[0]},{a[1]}", f"new={a[0]}", "--out", str(tmp_path / "first")])
    removal_seeds.main([f"new={b[0]},{b[1]}", "--keep", str(tmp_path / "first.json"), "--out", str(tmp_path / "second")])
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert list(second) == ["old", "new"] and second["old"] == first["old"]
    assert second["new"]["LN-free"]["mean"] == pytest.approx(3.805)
    assert "| old | 0, 1 |" in (tmp_path / "second.md").read_text()
