"""benchmarks.ln_free_expressivity: means over layers, then mean ± sd over seeds, model against baseline."""

import json

import pytest

from benchmarks import ln_free_expressivity as bench


def report(model_entropy, base_entropy):
    def side(entropy):
        return {"expressivity": {
            "unselectable_keys": {"per_layer": [0.0, 0.5], "keys_per_sequence": 64, "d_head": 32, "undecided": 1},
            "all_ones_component": {"block_input": [0.1, 0.3], "attention_input": [1e-8, 3e-8]},
            "attention_entropy": {"per_layer": entropy}}}
    return {"results": {bench.MODEL: side(model_entropy), bench.BASELINE: side(base_entropy)}}


def test_seeds_are_averaged_over_layers_then_over_seeds(tmp_path, capsys):
    for seed, (m, b) in enumerate([([0.6, 0.8], [0.7, 0.9]), ([0.4, 0.6], [0.7, 0.9])]):
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "report.json").write_text(json.dumps(report(m, b)))
    assert bench.main([f"gpt2={tmp_path / '0'}", f"gpt2={tmp_path / '1'}", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out.json").read_text())["families"]["gpt2"]
    entropy = summary["rows"]["attention entropy / uniform"]
    assert entropy["model"] == pytest.approx([0.6, 0.1 * 2 ** 0.5])  # seed means 0.7 and 0.5
    assert entropy["difference"] == pytest.approx([-0.2, 0.1 * 2 ** 0.5])
    assert entropy["model_per_layer"] == pytest.approx([0.5, 0.7])
    assert summary["seeds"] == 2 and summary["undecided_lps"] == 4
    assert "| gpt2 | 2 | attention entropy / uniform | 0.6000 ± 0.1414 | 0.8000 ± 0.0000 | -0.2000 ± 0.1414 |" \
        in capsys.readouterr().out
