"""LN-free models are recognised from their weights, in every published format, with no config key.

The published formats are rebuilt here from our own trained checkpoint (checkpoints/tiny-gpt2-stdlib) by
hand, following the papers' recipes and not our export code. Both start from the same fixed-scale model: each
LayerNorm l replaced by `(x - mean) / sigma_l * w_l + b_l`, sigma_l its mean per-token std on held-out code.
- Baroni et al. 2025: every LN's weight x 1e6/sigma_l, bias kept, eps 1e12 on each LN and in the config.
- Heimersheim 2024 (Apollo): ln_1/ln_2 weight 1e6 and bias 0 with w/sigma and b folded by hand into the
  c_attn/c_fc that read them; ln_f weight 1e6 w/sigma, bias b; eps 1e12.
Tolerances: the eps trick's own error is var / (2e12) ~ 1e-12 here, so HF <-> TransformerLens logits differ by
fp32 rounding (< 1e-4, the LN-free gate of `surgery verify`).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from lens_models import write_text_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.cli.entry import main
from surgery.errors import SurgeryError
from surgery.lens import has_normalization, load_hooked
from surgery.lens.checks import logit_agreement, verify_ln_free
from surgery.models.ln_free import check_consistent, detect_ln_free, scan_norms

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-gpt2-stdlib"
SCALE, EPS = 1e6, 1e12
ARGS = ["--block-size", "64", "--seg-len", "16", "--prompts", "4", "--val-blocks", "4", "--dla-blocks", "2"]
NORMS = [f"transformer.h.{i}.{n}" for i in range(4) for n in ("ln_1", "ln_2")] + ["transformer.ln_f"]



def original():
    return AutoModelForCausalLM.from_pretrained(CHECKPOINT).eval()


@pytest.fixture(scope="module")
def tokens():
    """(4, 64) held-out tokens: standard-library code the checkpoint's tokenizer knows."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tok(text)["input_ids"][: 4 * 64]
    return torch.tensor(ids).reshape(4, 64)


@torch.no_grad()
def ln_sigmas(model, tokens) -> dict[str, float]:
    """Each LayerNorm's mean per-token std of its input, by module name."""
    sigmas, handles = {}, []

    def hook(name):
        def record(m, args, out):
            sigmas[name] = (args[0].var(-1, unbiased=False) + m.eps).sqrt().mean().item()

        return record

    for name, ln in model.named_modules():
        if isinstance(ln, torch.nn.LayerNorm):
            handles.append(ln.register_forward_hook(hook(name)))
    model(tokens)
    for h in handles:
        h.remove()
    return sigmas


@torch.no_grad()
def to_baroni(model, sigmas):
    """Every LN: weight x 1e6/sigma, bias unchanged, eps 1e12 (module and config). Changes `model` in place."""
    for name, ln in model.named_modules():
        if isinstance(ln, torch.nn.LayerNorm):
            ln.weight.mul_(SCALE / sigmas[name])
            ln.eps = EPS
    model.config.layer_norm_epsilon = EPS
    return model


@torch.no_grad()
def to_apollo(model, sigmas):
    """ln_1/ln_2: weight 1e6, bias 0, their affine w/sigma, b folded into c_attn / c_fc (Conv1D: y = x W + c);
    ln_f: weight 1e6 w/sigma, bias b; eps 1e12. Changes `model` in place."""
    for i, block in enumerate(model.transformer.h):
        for ln_name, conv in (("ln_1", block.attn.c_attn), ("ln_2", block.mlp.c_fc)):
            ln = getattr(block, ln_name)
            gain = ln.weight / sigmas[f"transformer.h.{i}.{ln_name}"]
            conv.bias.add_(ln.bias @ conv.weight)
            conv.weight.mul_(gain[:, None])
            ln.weight.fill_(SCALE)
            ln.bias.zero_()
            ln.eps = EPS
    ln_f = model.transformer.ln_f
    ln_f.weight.mul_(SCALE / sigmas["transformer.ln_f"])
    ln_f.eps = EPS
    model.config.layer_norm_epsilon = EPS
    return model


@pytest.fixture(scope="module")
def formats(tokens):
    sigmas = ln_sigmas(original(), tokens)
    return {"baroni": to_baroni(original(), sigmas), "apollo": to_apollo(original(), sigmas)}


@pytest.fixture(scope="module")
def saved(formats, tmp_path_factory):
    root = tmp_path_factory.mktemp("ln_free")
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    dirs = {"corpus": write_text_corpus(root / "corpus.jsonl", n_docs=100)}
    for name, model in formats.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))


def test_both_formats_compute_the_same_fixed_scale_model(formats, tokens):
    with torch.no_grad():
        diff = formats["baroni"](tokens).logits - formats["apollo"](tokens).logits
    assert diff.abs().max() < 1e-4


@pytest.mark.parametrize("fmt", ["baroni", "apollo"])
def test_published_format_is_detected_without_the_key(formats, tokens, fmt):
    model = formats[fmt]
    assert getattr(model.config, "surgery_ln_free", None) is None
    scan = scan_norms(model)
    assert list(scan.scale_excess) == NORMS and scan.fixed == NORMS and scan.ln_free and scan.kind() == "LN-free"
    assert max(scan.scale_excess.values()) < 1e-9  # var / (2 eps): order-1 activations against eps 1e12
    assert detect_ln_free(model, tokens)
    base = scan_norms(original())
    assert base.normalizing == NORMS and min(base.scale_excess.values()) > 10 and not detect_ln_free(original())


@pytest.mark.parametrize("fmt", ["baroni", "apollo"])
def test_load_hooked_has_no_normalization_and_matches_hf(formats, tokens, fmt):
    hooked = load_hooked(formats[fmt])
    assert not has_normalization(hooked) and not any("hook_scale" in n for n in hooked.hook_dict)
    agreement = logit_agreement(formats[fmt], hooked, tokens)
    assert agreement["hf_tl_max_abs_logit_diff"] < 1e-4
    assert verify_ln_free(formats[fmt], tokens)["dla_relative_error"] < 1e-5


@pytest.mark.parametrize("fmt", [pytest.param("baroni", marks=pytest.mark.slow), "apollo"])
def test_verify_applies_the_ln_free_gates(saved, tmp_path, capsys, fmt):
    out = tmp_path / "out"
    argv = ["verify", saved[fmt], "--out", str(out), "--data", saved["corpus"], *ARGS]
    if fmt == "apollo":
        argv += ["--baseline", str(CHECKPOINT)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "model (LN-free)" in printed and "LN-free checks passed" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == [] and report["results"]["model (LN-free)"]["has_normalization"] is False
    detection = report["ln_free_detection"]["model (LN-free)"]
    assert detection["kind"] == "LN-free" and detection["fixed_norms"] == 9 and detection["normalizing_norms"] == {}
    if fmt == "apollo":
        assert report["ln_free_detection"]["baseline (with LN)"]["kind"] == "with LN"


def test_eval_labels_the_norms(saved, tmp_path, capsys):
    for name, kind in (("baroni", "LN-free"), (str(CHECKPOINT), "with LN")):
        out = tmp_path / f"{Path(name).name}.json"
        model = saved.get(name, name)
        assert main(["eval", model, "--data", saved["corpus"], "--block-size", "64", "--max-blocks", "2", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["norms"] == kind
    assert "(LN-free)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def our_export_without_key(tokens, tmp_path_factory):
    """surgery.remove_ln on the checkpoint (every LN fake), exported, saved, then `surgery_ln_free` deleted."""
    from surgery.remove_ln import export_ln_free, prepare_for_removal

    model = original()
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        model(tokens)
    for ln in points.values():
        ln.go_fake()
    path = tmp_path_factory.mktemp("export") / "model"
    export_ln_free(model.eval()).save_pretrained(path)
    AutoTokenizer.from_pretrained(CHECKPOINT).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    del config["surgery_ln_free"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_our_export_without_the_key_is_still_ln_free(our_export_without_key, saved, tmp_path, tokens, capsys):
    model = AutoModelForCausalLM.from_pretrained(our_export_without_key).eval()
    assert getattr(model.config, "surgery_ln_free", None) is None and detect_ln_free(model)
    assert logit_agreement(model, load_hooked(model), tokens)["hf_tl_max_abs_logit_diff"] < 1e-4
    out = tmp_path / "out"
    assert main(["verify", str(our_export_without_key), "--out", str(out), "--data", saved["corpus"], *ARGS]) == 0
    assert "LN-free checks passed" in capsys.readouterr().out


def one_real_ln_left(tokens):
    """The Baroni format with transformer.h.1.ln_2 left a real LayerNorm (original weight and eps 1e-5)."""
    sigmas = ln_sigmas(original(), tokens)
    model = to_baroni(original(), sigmas)
    real = original().transformer.h[1].ln_2
    ln = model.transformer.h[1].ln_2
    with torch.no_grad():
        ln.weight.copy_(real.weight)
    ln.eps = real.eps
    return model


def test_a_model_with_one_real_ln_is_refused_naming_it(tokens):
    from surgery.ln_tune import ln_tune

    model = one_real_ln_left(tokens)
    scan = scan_norms(model)
    assert scan.normalizing == ["transformer.h.1.ln_2"] and len(scan.fixed) == 8 and scan.kind() == "partly LN-free"
    expected = r"is only partly LN-free: 8 norm\(s\) are neutralised .* but 1 still normalize per token: transformer\.h\.1\.ln_2 \(eps 1e-05, scale varies by"
    for call in (detect_ln_free, load_hooked, ln_tune):
        with pytest.raises(SurgeryError, match=expected):
            call(model)


def test_ln_tuning_refuses_a_published_ln_free_model(formats):
    from surgery.ln_tune import ln_tune

    with pytest.raises(SurgeryError, match="is LN-free \\(every norm's per-token scale is fixed by a huge epsilon\\).*nothing to LN-tune"):
        ln_tune(formats["apollo"])


def test_a_removal_in_progress_is_partly_ln_free_not_an_error(tokens):
    from surgery.remove_ln import prepare_for_removal

    model = original()
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        model(tokens)
    for name in ("h.0.ln_2", "h.1.ln_2"):
        points[name].go_fake()
    scan = scan_norms(model.eval())
    assert scan.removal_in_progress and scan.kind() == "partly LN-free" and len(scan.fixed) == 2
    assert len(scan.normalizing) == 11  # 4 x (ln_1 qk copy, ln_1 v copy, ln_2) + ln_f, less the 2 fake ones
    check_consistent(model, scan)  # what `surgery eval` allows for a Lightning checkpoint mid-removal
    with pytest.raises(SurgeryError, match="is only partly LN-free"):
        detect_ln_free(model)


def test_xatl_transfer_from_a_published_format_gives_an_ln_free_hybrid(formats, tokens):
    from surgery.xatl import HybridGPT2LMHeadModel, hybrid_config_from
    from surgery.xatl.transfer.weights import transfer_shared_weights

    source = formats["baroni"]
    torch.manual_seed(0)
    target = HybridGPT2LMHeadModel(hybrid_config_from(source.config, "retention", None, [])).eval()
    transfer_shared_weights(source, target)
    assert torch.equal(target.transformer.ln_f.weight, source.transformer.ln_f.weight)
    assert detect_ln_free(target, tokens) and getattr(target.config, "surgery_ln_free", None) is None

