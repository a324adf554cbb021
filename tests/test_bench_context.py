"""benchmarks/xatl_context: gaps to the source per context length, mean and sample sd over seeds, from runs whose
scoring is replaced by a table of losses (the scoring itself is `surgery eval`'s cross-entropy)."""

import json
import statistics

import pytest

from benchmarks import xatl_context

LOSSES = {"src": {64: 3.9, 128: 3.8, 256: 3.7}, "s0": {64: 4.0, 128: 3.95, 256: 4.1}, "s1": {64: 4.1, 128: 3.9, 256: 4.0}}


def _run(path, seed, block_size=128):
    (path / "logs").mkdir(parents=True)
    (path / "logs" / "config.yaml").write_text(f"seed_everything: {seed}\ndata:\n  init_args:\n    data: stdlib\n"
                                               f"    block_size: {block_size}\n")
    (path / "metrics.json").write_text(json.dumps({"started_from": {"local_path": "src"}, "val": {"loss": LOSSES[path.name][block_size]},
                                                   "xatl": {"mixer": "mamba2", "attn_layers": [0],
                                                            "source_val_loss": LOSSES["src"][block_size]}}))
    return path


def test_gaps_per_length_over_seeds_cached_per_run(tmp_path, monkeypatch):
    calls = []

    def fake_score(model, tokenizer, data, length, batch_size=16):
        calls.append((model, length))
        return LOSSES["src" if model == "src" else model.split("/")[-2]][length]

    monkeypatch.setattr(xatl_context, "score", fake_score)
    runs = [_run(tmp_path / f"s{i}", i) for i in range(2)]
    cache, lengths = {}, [64, 128, 256]
    r = xatl_context.summarize([xatl_context.run_losses(run, lengths, cache) for run in runs], lengths)
    gaps = [LOSSES[s][256] - LOSSES["src"][256] for s in ("s0", "s1")]
    assert r["gap"][256] == {"mean": pytest.approx(statistics.fmean(gaps)), "std": pytest.approx(statistics.stdev(gaps)),
                             "n": 2}
    assert r["train_length"] == 128 and [row["seed"] for row in r["runs"]] == [0, 1]
    assert sorted(L for m, L in calls if m == "src") == [64, 256]  # once per length; 128 from metrics.json
    assert (str(runs[0] / "model"), 128) not in calls
    md = xatl_context.table({"gpt2-mamba2": r}, lengths)
    assert f"**{r['gap'][128]['mean']:+.3f} ± {r['gap'][128]['std']:.3f} (n=2)**" in md  # the training length in bold
    assert "| gpt2-mamba2 | mamba2 | 128 | 3.900 / 3.800 / 3.700 | " in md
    calls.clear()
    again = xatl_context.run_losses(runs[0], lengths, {})
    assert calls == [] and again["source"] == r["runs"][0]["source"]  # all from <run>/context_eval.json
