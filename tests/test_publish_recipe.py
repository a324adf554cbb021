"""A recipe's `publish:` section: `PublishRun` publishes the run when fit ends (here as a dry run), after
ExportRun wrote model/ and metrics.json; it does nothing unless repo_id is set, and fails before training
on a bad repo id or a missing token."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from surgery.cli.entry import main
from surgery.errors import SurgeryError
from surgery.publish.callback import PublishRun

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ln_tune" / "tiny-gpt2-email.yaml"


@pytest.mark.slow
def test_recipe_publishes_its_run_at_the_end(tiny_lm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["fit", "--config", str(RECIPE), "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--model.init_args.init", str(tiny_lm_dir),
            "--model.init_args.warmup_steps", "1", "--data.init_args.tokenizer", str(tiny_lm_dir), "--data.init_args.part", "json",
            "--data.init_args.block_size", "32", "--data.init_args.batch_size", "2",
            "--publish.repo_id", "my-user/tiny-gpt2-json", "--publish.dry_run", "published"]
    assert main(args) == 0
    out = run / "published"
    assert f"publish: wrote {out} (dry run, nothing uploaded)" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["publish"]["repo_id"] == "my-user/tiny-gpt2-json"
    metrics = json.loads((run / "metrics.json").read_text())
    card = (out / "README.md").read_text()
    assert f"| validation loss (nats/token) | {metrics['val']['loss']:.4f} |" in card
    assert f"| validation loss before tuning (nats/token) | {metrics['ln_tune']['val_before']['loss']:.4f} |" in card
    assert "| trainable LayerNorm entries (all) | 320 of 320 |" in card and "- ln-tuning" in card
    assert not (run / "published.json").exists()  # a dry run is not a publication


def fake_trainer(root) -> SimpleNamespace:
    return SimpleNamespace(default_root_dir=str(root), is_global_zero=True)


def test_publish_is_off_without_repo_id_or_an_ended_fit(tmp_path, monkeypatch):
    import surgery.publish as publish

    calls = []
    monkeypatch.setattr(publish, "publish", lambda *a, **k: calls.append(a))
    off = PublishRun()
    off.on_fit_end(fake_trainer(tmp_path), None)
    off.teardown(fake_trainer(tmp_path), None, "fit")
    interrupted = PublishRun(repo_id="me/x", dry_run="out")  # teardown without on_fit_end: the fit did not end
    interrupted.teardown(fake_trainer(tmp_path), None, "fit")
    assert calls == []


def test_bad_settings_fail_before_training(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(SurgeryError, match="invalid repo id 'not a repo'"):
        PublishRun(repo_id="not a repo").setup(fake_trainer(tmp_path), None, "fit")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(SurgeryError, match="no Hugging Face token found"):
        PublishRun(repo_id="me/x").setup(fake_trainer(tmp_path), None, "fit")
    PublishRun(repo_id="me/x", dry_run="out").setup(fake_trainer(tmp_path), None, "fit")  # a dry run needs no token


def test_failed_publish_names_the_finished_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()  # a run directory without model/ and metrics.json
    run = PublishRun(repo_id="me/x", dry_run="out")
    run.on_fit_end(fake_trainer(tmp_path), None)
    with pytest.raises(SurgeryError, match=r"not a finished run(.|\n)*The run itself finished in .*surgery publish"):
        run.teardown(fake_trainer(tmp_path), None, "fit")
