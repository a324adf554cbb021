"""`surgery verify`: report files, the side-by-side table, LN-free criteria, and user-facing errors.

Thresholds are those of the issue: hf_tl_max_abs_logit_diff < 1e-4 and dla_relative_error < 1e-5 for an LN-free
model; for a model with LayerNorm the DLA error must be clearly larger (> 1e-2; measured ~0.9).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from lens_models import make_ln_free, save_model_dirs, tiny_gpt2, write_text_corpus

from surgery.cli.entry import main

ARGS = ["--block-size", "64", "--seg-len", "16", "--prompts", "6", "--val-blocks", "8", "--dla-blocks", "2"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    corpus = write_text_corpus(root / "corpus.jsonl")
    baseline, ln_free = save_model_dirs(root, corpus)
    return {"root": root, "corpus": corpus, "baseline": baseline, "ln_free": ln_free}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))


def test_verify_ln_free_against_baseline(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["verify", dirs["ln_free"], "--baseline", dirs["baseline"], "--out", str(out), "--data", dirs["corpus"], *ARGS])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "dla_relative_error" in printed and "baseline (with LN)" in printed and "LN-free checks passed" in printed
    report = json.loads((out / "report.json").read_text())
    free, base = report["results"]["model (LN-free)"], report["results"]["baseline (with LN)"]
    assert free["has_normalization"] is False and base["has_normalization"] is True
    assert free["hf_scale_spread"] < 1e-9 < 0.1 < base["hf_scale_spread"]
    assert free["hf_tl_max_abs_logit_diff"] < 1e-4 and base["hf_tl_max_abs_logit_diff"] < 1e-4
    assert free["dla_relative_error"] < 1e-5 < 1e-2 < base["dla_relative_error"]
    for r in (free, base):
        assert len(r["attention_sink_mass"]) == 2 and all(0.0 <= m <= 1.0 for m in r["attention_sink_mass"])
        assert len(r["patching"]["activation_patching"]) == len(r["patching"]["attribution_patching"]) == 4
        assert r["validation"]["tokens"] == report["validation_blocks"] * 63 > 0  # 63 predicted tokens per block
    assert report["failures"] == [] and report["transformer_lens"]
    md = (out / "report.md").read_text()
    assert "| dla_relative_error |" in md and "| has_normalization | false | true |" in md
    assert (out / "dla_error_per_layer.png").stat().st_size > 1000
    assert (out / "patching_scatter.png").stat().st_size > 1000
    for name in ("calibration.png", "first_position_norm.png", "entropy_neurons.png"):
        assert (out / name).stat().st_size > 1000
    check_analyses(report, md)


ANALYSIS_ROWS = ["output entropy (nats/token)", "expected calibration error (10 bins)", "first-position norm ratio, final layer",
                 "attention-sink rate (heads > 0.3 on position 0)", "entropy neurons mean-ablated: change of entropy"]


def check_analyses(report: dict, md: str) -> None:
    """Each analysis row has a finite value for the model and its baseline, and the output statistics are over the
    same tokens as the validation cross-entropy (so their loss agrees with it to float32 summation error)."""
    for row in ANALYSIS_ROWS:
        cells = next(line for line in md.splitlines() if line.startswith(f"| {row} |")).strip("| ").split(" | ")[1:]
        assert len(cells) == 2 and all(math.isfinite(float(c)) for c in cells), row
    assert "ECE = sum_b (n_b / N) |acc_b - conf_b|" in md and "0.9 quantile" in md
    for r in report["results"].values():
        a = r["analyses"]
        assert a["output"]["tokens"] == r["validation"]["tokens"]
        assert a["output"]["loss"] == pytest.approx(r["validation"]["loss"], rel=1e-5)
        assert 0 < a["output"]["entropy"] < math.log(300) and 0 <= a["output"]["ece"] <= 1
        assert sum(a["output"]["bins"]["count"]) == a["output"]["tokens"]
        assert len(a["first_position_norm"]["ratio"]) == 2 and all(x > 0 for x in a["first_position_norm"]["ratio"])
        sinks = torch.tensor(a["attention_sink_heads"])  # (layer, head): its mean over heads is the per-layer mass
        assert sinks.mean(1).tolist() == pytest.approx(r["attention_sink_mass"], abs=1e-6)
        assert a["attention_sink_rate"] == (sinks > 0.3).double().mean().item()
        assert len(a["entropy_neurons"]["norm"]) == 4 * 32


@pytest.mark.slow
def test_verify_another_shape_without_baseline(dirs, tmp_path):
    """Nothing depends on one shape: 3 layers, 6 heads, d_model 48, 100 positions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["ln_free"])
    model_dir = tmp_path / "other"
    make_ln_free(tiny_gpt2(n_layer=3, n_head=6, n_embd=48, n_positions=100, vocab_size=len(tok))).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["verify", str(model_dir), "--out", str(out), "--data", dirs["corpus"], *ARGS]) == 0
    result = json.loads((out / "report.json").read_text())["results"]["model (LN-free)"]
    assert result["dla_relative_error"] < 1e-5 and len(result["attention_sink_mass"]) == 3
    assert len(result["patching"]["activation_patching"]) == 18


def test_error_ln_free_flag_over_real_layernorms(dirs, tmp_path, capsys):
    """A config that claims LN-free while its LayerNorms keep eps 1e-5 (they still normalize per token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["ln_free"])
    hf = tiny_gpt2(vocab_size=len(tok))
    hf.config.surgery_ln_free = {"scale": 1e6}
    hf.save_pretrained(tmp_path / "broken")
    tok.save_pretrained(tmp_path / "broken")
    rc = main(["verify", str(tmp_path / "broken"), "--out", str(tmp_path / "out"), "--data", dirs["corpus"], *ARGS])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config.surgery_ln_free says model" in err and "but its norms still normalize per token" in err
    assert "transformer.h.0.ln_1 (eps 1e-05, scale varies by" in err


def test_error_not_a_model_directory(dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "is not a model directory (no config.json" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_error_model_without_tokenizer(dirs, tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "no_tok")
    assert main(["verify", str(tmp_path / "no_tok"), "--out", str(tmp_path / "out"), "--data", dirs["corpus"], *ARGS]) == 2
    assert "no tokenizer.json in" in capsys.readouterr().err


def test_error_baseline_vocabulary_mismatch(dirs, tmp_path, capsys):
    other = save_model_dirs(tmp_path, dirs["corpus"], vocab=290)[0]
    rc = main(["verify", dirs["ln_free"], "--baseline", other, "--out", str(tmp_path / "out"), "--data", dirs["corpus"], *ARGS])
    assert rc == 2
    err = capsys.readouterr().err
    assert "have vocabulary sizes" in err and "the baseline must be the model the LN-free export was made from" in err


def test_error_prompts_longer_than_context(dirs, tmp_path, capsys):
    rc = main(["verify", dirs["ln_free"], "--out", str(tmp_path / "out"), "--seg-len", "40"])
    assert rc == 2
    assert "80-token prompts, longer than the context (64)" in capsys.readouterr().err
