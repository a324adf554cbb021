"""`surgery bench` bookkeeping on tiny sizes: interleaving, paired ratios, phases, tables, JSON, PNG and
the CLI's error paths. Speed is never asserted (shared, noisy machines)."""

import argparse
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks import measure, mixer_cost, removal_cost, report
from benchmarks import bench
from surgery.errors import SurgeryError



def test_interleaved_alternates_order_and_ratio_is_median_of_pairs():
    calls = []
    t = measure.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then order reversed on odd rounds
    t = {"a": {"times": [1.0, 2.0, 10.0], "cpu_times": [1.0, 1.0, 1.0]}, "b": {"times": [2.0, 2.0, 2.0], "cpu_times": [3.0, 2.0, 1.5]}}
    assert measure.paired_ratio(t, "b", "a") == pytest.approx(1.0)  # median of 2, 1, 0.2
    assert measure.paired_ratio(t, "b", "a", "cpu_times") == pytest.approx(2.0)  # median of 3, 2, 1.5


def test_thread_cpu_time_leaves_out_sleeping():
    """A step that waits (as when another process holds the core) costs wall time, not thread CPU time."""
    import time
    t = measure.interleaved({"busy": lambda: sum(range(200_000)), "waits": lambda: (sum(range(200_000)), time.sleep(0.05))},
                            repeats=3, warmup=0, memory=False)
    assert measure.paired_ratio(t, "waits", "busy") > 1.5
    assert measure.paired_ratio(t, "waits", "busy", "cpu_times") < 1.5
    assert all(c <= w + 1e-3 for c, w in zip(t["waits"]["cpu_times"], t["waits"]["times"]))


def test_peak_rss_sees_a_large_allocation():
    with measure.PeakRSS() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    if mem.mib is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 <= mem.mib <= 200


def test_profile_pair_finds_the_extra_op():
    x = torch.randn(512, 512)  # var takes ~2 ms, far above a preempted allocation on a loaded machine
    prof = measure.profile_pair(lambda: x @ x, lambda: (x @ x, x.var(-1)), rounds=2)
    top = prof["extra"][0]
    assert top["op"] == "aten::var" and top["base_calls"] == 0 and top["other_calls"] == 1
    assert top["shape"] == "[512, 512]"  # ops are told apart by the shape of their first input
    assert prof["removal_total_ms"] > 0 and prof["plain_total_ms"] > 0


@pytest.mark.slow
def test_removal_phases_fake_counts_and_table(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, eos_token_id=0))
    res = removal_cost.run("toy", batch=2, seq=16, repeats=2, warmup=0, model=model, profile=False)
    points = res.pop("removal_model")
    assert [r["phase"] for r in res["rows"]] == ["before", "during", "after"]
    # 2 blocks -> 7 points; half in removal order = both ln_2 and h.0.ln_1_qk
    assert [r["fake_points"] for r in res["rows"]] == [0, 3, 7] and res["rows"][0]["points"] == 7
    for r in res["rows"]:
        assert len(r["plain_times"]) == len(r["removal_times"]) == 2
        pairs = [a / b for a, b in zip(r["removal_times"], r["plain_times"])]
        assert r["ratio"] == pytest.approx(sum(pairs) / 2)  # median of two
        cpu_pairs = [a / b for a, b in zip(r["removal_cpu_times"], r["plain_cpu_times"])]
        assert r["ratio_cpu"] == pytest.approx(sum(cpu_pairs) / 2)
        assert r["plain_tok_s"] == pytest.approx(32 / r["plain_s"])
    assert removal_cost.removal_order(2)[:3] == ["h.0.ln_2", "h.1.ln_2", "h.0.ln_1_qk"]
    table = report.removal_table(res)
    assert "| phase | fake LNs |" in table and "| during | 3/7 |" in table and "ratio, thread CPU time" in table
    res["profile"] = {"after": {"plain_total_ms": 10.0, "removal_total_ms": 12.0,
                                "extra": [{"op": "aten::var", "shape": "[8, 16]", "base_ms": 0.0, "other_ms": 2.0, "extra_ms": 2.0,
                                           "base_calls": 0, "other_calls": 5}]}}
    assert "| aten::var | [8, 16] | 0.0 (0) | 2.0 (5) | +2.0 |" in report.removal_table(res)
    del points


@pytest.mark.slow
def test_mixer_rows_grid_and_plot(tmp_path):
    models = mixer_cost.build(width=16, depth=1, heads=2, vocab=32, max_seq=32)
    train = mixer_cost.train_rows(models, seqs=[8, 32], repeats=1, warmup=0, max_seq={"hf-mamba": 8}, long_seq=16)
    assert [(r["model"], r["seq"]) for r in train] == [(m, 8) for m in mixer_cost.MODELS] + [
        (m, 32) for m in mixer_cost.MODELS[:-1]]
    by = {(r["model"], r["seq"]): r for r in train}
    assert by[("attention", 8)]["ratio_to_attention"] == 1.0 and "speedup_vs_hf" in by[("mamba", 8)]
    assert "speedup_vs_hf" not in by[("mamba", 32)]  # hf-mamba capped at 8 tokens
    assert by[("mamba", 32)]["tok_s"] == pytest.approx(32 / by[("mamba", 32)]["step_s"])
    gen = mixer_cost.generation_rows(models, contexts=[8], new_tokens=2)
    assert [r["model"] for r in gen] == list(mixer_cost.MODELS)
    assert all(0 < r["ms_fastest"] <= r["ms_per_token"] for r in gen) and gen[0]["ratio_to_attention"] == 1.0
    assert [r["model"] for r in gen if "hf_over_ours" in r] == ["mamba", "mamba2"]
    assert "speedup_vs_hf" in by[("mamba2", 8)] and "speedup_vs_hf" in by[("mamba2", 32)]  # hf-mamba2 uncapped
    md = report.mixer_tables(train, gen)
    assert "| model | L=8 | L=32 |" in md and "| hf-mamba |" in md and md.count("| hf-mamba |") == 3
    assert f"hf-mamba / our mamba, decoding step time (target >= 1): L=8: {gen[1]['hf_over_ours']:.2f}" in md
    assert f"hf-mamba2 / our mamba2, decoding step time (target >= 1): L=8: {gen[2]['hf_over_ours']:.2f}" in md
    assert "Our mamba2 vs hf-mamba2, training tokens/s (target >= 3x): L=8: " in md
    report.plot(train, gen, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert mixer_cost.fla_status() == "available" or mixer_cost.fla_status().startswith("not available on CPU")


def run_bench(argv: list[str]) -> int:
    """`python -m benchmarks ARGV`, in this process."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


@pytest.mark.slow
def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = run_bench(["--out", str(out), "--sections", "mixers", "gpu", "--mixer-seqs", "8", "16",
               "--mixer-width", "16", "--mixer-depth", "1", "--mixer-repeats", "1", "--new-tokens", "1"])
    assert rc == 0
    record = json.loads((out / "bench.json").read_text())
    assert set(record) >= {"machine_start", "machine_end", "mixers", "gpu"}
    assert len(record["machine_start"]["loadavg"]) == 3 and record["machine_start"]["torch"] == torch.__version__
    assert len(record["mixers"]["train"]) == 2 * len(mixer_cost.MODELS) and (out / "mixers.png").exists()
    if not torch.cuda.is_available():
        assert record["gpu"] == "skipped: torch.cuda.is_available() is False"
    assert "load average at start" in (out / "bench.md").read_text()
    assert [r["seq"] for r in record["mixers"]["mamba2_mixer"]] == [8, 16]
    assert all(r["max_abs_diff"] < 1e-5 for r in record["mixers"]["mamba2_mixer"])  # the same function timed
    assert "One Mamba-2 mixer alone, forward + backward" in (out / "bench.md").read_text()


def test_cli_refuses_bad_sizes(capsys, tmp_path):
    with pytest.raises(SurgeryError, match="--batch must be >= 1 and --seq / --mixer-seqs >= 2 tokens"):
        run_bench(["--seq", "1"])
    with pytest.raises(SurgeryError, match=r"^--mixer-models mamba3: unknown; choose from attention mamba mamba2 "):
        run_bench(["--sections", "mixers", "--mixer-models", "mamba3", "--out", str(tmp_path)])


def test_progress_lines_are_key_value_pairs_without_timing_lists():
    from benchmarks.report import progress_line

    line = progress_line({"model": "tiny", "ratio": 1.0234567, "plain_times": [0.1, 0.2], "profile": {"a": 1}, "points": 13})
    assert line == "model=tiny  ratio=1.023  points=13"
