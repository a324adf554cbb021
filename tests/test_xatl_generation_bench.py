"""The generation benchmark's bookkeeping: rows, cache sizes (KV grows with context, mixer states do not),
ratios against attention, table and plot. Speed itself is not asserted (shared, noisy machines)."""

import pytest
import torch

from benchmarks.generation import build_models, run_benchmark, table, plot



def test_rows_cache_sizes_and_outputs(tmp_path):
    d, depth, warmup, new = 32, 2, 2, 3
    models = build_models(width=d, depth=depth, heads=2, vocab=64, max_context=48)
    rows = run_benchmark(contexts=[16, 48], new_tokens=new, models=models, repeats=2)
    assert [(r["model"], r["context"]) for r in rows] == [(m, c) for c in (16, 48) for m in
                                                          ("attention", "mamba", "retention", "gla")]
    by = {(r["model"], r["context"]): r for r in rows}
    for c in (16, 48):  # fp32 keys and values: 2 x layers x tokens seen x width x 4 bytes
        seen = c + warmup + new  # the prompt, then every decoded step feeds one token
        assert by[("attention", c)]["cache_bytes_per_seq"] == 2 * depth * seen * d * 4
        assert by[("attention", c)]["ratio_to_attention"] == 1.0
        assert all(by[(m, c)]["cache_tokens"] == seen for m in ("attention", "mamba", "retention", "gla"))
    # mixer states are fixed in size: mamba (conv inputs E x 3 + SSM E x 16, E = 2d), GLA (H x d/2H x d/H)
    assert by[("mamba", 16)]["cache_bytes_per_seq"] == by[("mamba", 48)]["cache_bytes_per_seq"] == depth * (2 * d * 3 + 2 * d * 16) * 4
    assert by[("gla", 16)]["cache_bytes_per_seq"] == by[("gla", 48)]["cache_bytes_per_seq"] == depth * (d // 2) * (d // 2) * 4
    assert by[("retention", 48)]["cache_bytes_per_seq"] == depth * d * (d // 2) * 4
    for r in rows:
        assert r["ms_per_token"] > 0 and r["ratio_to_attention"] == pytest.approx(
            r["ms_per_token"] / by[("attention", r["context"])]["ms_per_token"])
    md = table(rows)
    assert md.splitlines()[0] == "| model | L=16 | L=48 | cache/seq at L=48 |" and len(md.splitlines()) == 6
    plot(rows, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
