"""A whole removal run through `surgery fit` on a tiny GPT-2: report, control twin, export, `surgery export`."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.cli.entry import main
from surgery.remove_ln.export import marked_ln_free
from reliability_setup import fit_args, write_setup


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("removal")
    recipe = write_setup(root, dropout=0.0)
    run = root / "run"
    import os

    os.environ["SURGERY_CACHE"] = str(root / "cache")
    assert main(fit_args(recipe, run, "--model.init_args.control", "true")) == 0
    return root, run


def test_run_reports_original_control_and_ln_free_losses(finished_run):
    root, run = finished_run
    metrics = json.loads((run / "metrics.json").read_text())
    losses = metrics["val_loss"]
    assert set(losses) == {"original", "control (LN kept)", "LN-free"}
    assert losses["control (LN kept)"] < losses["original"] - 0.01  # the twin trains: a random init learns fast
    assert metrics["gap_vs_control"] == pytest.approx(losses["LN-free"] - losses["control (LN kept)"])
    assert metrics["gap_vs_original"] == pytest.approx(losses["LN-free"] - losses["original"])
    assert metrics["gap_vs_best"] == pytest.approx(losses["LN-free"] - min(losses["original"], losses["control (LN kept)"]))
    assert metrics["losses"] == "1 x CE"  # the setup's recipe has no distill section: cross-entropy alone
    assert metrics["val"]["loss"] == pytest.approx(losses["LN-free"])
    assert metrics["export_logit_diff"]["relative"] < 1e-4
    assert [r["point"] for r in metrics["removed"]] == ["h.0.ln_2", "h.1.ln_2", "h.0.ln_1_qk", "h.1.ln_1_qk", "h.0.ln_1_v", "h.1.ln_1_v", "ln_f"]
    assert [r["step"] for r in metrics["removed"]] == [3, 4, 5, 6, 8, 10, 14]
    assert all(r["sigma"] > 0 for r in metrics["removed"])
    assert (run / "loss.png").stat().st_size > 1000 and (run / "sigma.png").stat().st_size > 1000


def test_export_command_rebuilds_the_run_model_from_its_checkpoint(finished_run, tmp_path):
    root, run = finished_run
    out = tmp_path / "exported"
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    ours, theirs = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(run / "model")
    assert marked_ln_free(ours) and (out / "tokenizer.json").exists()
    ids = torch.randint(0, 4096, (2, 32))
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 2  # never overwrites


def test_export_of_a_run_stopped_mid_removal_is_refused(finished_run, tmp_path, capsys):
    root, _ = finished_run
    run = root / "short"
    assert main(fit_args(root / "recipe.yaml", run, "--export.enabled", "false")) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["model.transformer.ln_f.fake"] = torch.tensor(0.0)  # as if killed before ln_f went
    torch.save(state, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "1 norm(s) are still real or use special sigmas (ln_f" in capsys.readouterr().err


def test_max_steps_ending_before_the_schedule_is_refused(finished_run, capsys):
    root, _ = finished_run
    assert main(fit_args(root / "recipe.yaml", root / "too-short", "--trainer.max_steps", "12")) == 2
    assert ("trainer.max_steps=12 ends before the removal schedule does (its last event is at step 14): the run needs "
            "trainer.max_steps >= 15; raise trainer.max_steps or shorten model.init_args.schedule") in capsys.readouterr().err


def test_the_checkpoint_names_the_function_that_rebuilds_its_switchable_norms(finished_run, tmp_path, capsys):
    """The loader knows no surgery: the removal module records `prepare_model`, and a name outside the package is
    refused instead of imported."""
    from surgery.models.loading import PREPARE_KEY, load_causal_lm
    from surgery.remove_ln.points import find_points

    _, run = finished_run
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state[PREPARE_KEY] == "surgery.remove_ln.points:prepare_for_removal"
    assert len(find_points(load_causal_lm(str(ckpt)))) == 7
    state[PREPARE_KEY] = "os:system"
    torch.save(state, tmp_path / "bad.ckpt")
    assert main(["export", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint entry prepare_model='os:system' does not name a function of the surgery package" in capsys.readouterr().err
