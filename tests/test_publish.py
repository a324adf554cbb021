"""`surgery publish --dry-run`: the folder holds exactly what would be uploaded, loads with plain transformers
(no surgery import) with the run's logits, and its card carries the run's numbers; error paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from publish_runs import REMOVAL_METRICS, make_run, save_model
from surgery.cli.entry import main
from surgery.errors import SurgeryError
from surgery.publish import card, find_source, publish

REPO = "my-user/tiny-ln-free"
EXPECTED_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "recipe.yaml", "metrics.json", "plots/loss.png", "verify/report.json",
                  "verify/report.md"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(run directory, dry-run folder) of `surgery publish RUN --repo-id my-user/tiny-ln-free --dry-run OUT`."""
    root = tmp_path_factory.mktemp("publish")
    run = make_run(root / "run")
    assert main(["publish", str(run), "--repo-id", REPO, "--dry-run", str(root / "out")]) == 0
    return run, root / "out"


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_folder_holds_exactly_the_publishable_files(dry_run):
    run, out = dry_run
    assert files_under(out) == EXPECTED_FILES  # no checkpoints, logs or .bin weights
    assert (out / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    assert (out / "metrics.json").read_text() == (run / "metrics.json").read_text()
    assert (out / "recipe.yaml").read_text() == (run / "logs" / "config.yaml").read_text()
    assert json.loads((out / "config.json").read_text())["surgery_ln_free"] == {"scale": 1e6}


PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokens = torch.arange(64).reshape(2, 32) % model.config.vocab_size
with torch.no_grad():
    torch.save(model(tokens).logits, sys.argv[2])
assert not [m for m in sys.modules if m.split(".")[0] == "surgery"]
"""


@pytest.mark.slow
def test_folder_loads_with_plain_transformers_and_gives_the_runs_logits(dry_run, tmp_path):
    run, out = dry_run
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), str(tmp_path / "logits.pt")], check=True, cwd=tmp_path)
    published = torch.load(tmp_path / "logits.pt")
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    with torch.no_grad():
        expected = model(torch.arange(64).reshape(2, 32) % 64).logits
    assert published.abs().max() > 1.0  # real logits, not zeros
    assert torch.allclose(published, expected, rtol=0, atol=1e-5)  # same weights: equal up to thread-count rounding


def test_card_metadata_and_measurements(dry_run):
    _, out = dry_run
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert {"ln-free", "transformer-lens", "gpt2", "lm-surgery"} <= set(meta["tags"])
    assert meta["base_model"] == "gpt2"  # the recipe's model.init_args.init, a Hub name
    assert "datasets" not in meta  # 'stdlib' is not a Hub dataset
    for line in ("| validation loss, original (nats/token) | 4.5679 |", "| validation loss, control (LN kept) (nats/token) | 4.0123 |",
                 "| validation loss, LN-free (nats/token) | 4.0568 |", "| gap LN-free - control (nats/token) | +0.0444 |",
                 "| max abs logit diff, trained (fake LN) vs export | 5.72e-06 (3.99e-07 relative) |",
                 "| norm removal points made fake | 2 (last: ln_f at step 100) |", "| training tokens | 245,760 |"):
        assert line in text, line
    assert "| DLA relative error (exact DLA: ~0) | 1.21e-07 | 0.8875 |" in text  # from verify/report.json
    assert "| attribution vs activation patching correlation | 0.9877 |" in text
    assert "![loss](plots/loss.png)" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in text and f'load_hooked(snapshot_download("{REPO}"))' in text
    assert "in a process without `surgery`" in text and "`surgery.lens.load_hooked`: max abs difference" in text


def test_card_of_a_model_with_layernorm_and_local_base(tmp_path):
    run = make_run(tmp_path / "run", init=str(tmp_path / "run" / "model"), data="HuggingFaceFW/fineweb", verify=False, ln_free=False)
    source = find_source(run / "model")  # the model/ of a run publishes the whole run
    assert source.run_dir == run and source.metrics == REMOVAL_METRICS
    assert card.base_model(source) is None  # a local path is not a base_model
    assert card.datasets(source) == ["HuggingFaceFW/fineweb"]
    meta = card.metadata(source, ln_free=False, license="apache-2.0", base=None, data=["HuggingFaceFW/fineweb"])
    assert "ln-free" not in meta["tags"] and "transformer-lens" in meta["tags"] and "base_model" not in meta


@pytest.mark.slow
def test_a_shipped_checkpoint_path_is_not_a_base_model_from_anywhere(tmp_path, monkeypatch):
    """`checkpoints/tiny-gpt2-stdlib` reads like a Hub id (OWNER/NAME); from a run directory outside the clone and
    another working directory it used to be written as `base_model`, which the Hub refuses on upload."""
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "elsewhere" / "run", init="checkpoints/tiny-gpt2-stdlib", data="corpora/web.jsonl", verify=False)
    source = find_source(run)
    assert card.base_model(source) is None  # an older run (nothing recorded): the clone's checkpoints/ is searched
    assert card.datasets(source) == ["corpora/web.jsonl"]  # the old guess for a path that exists nowhere now
    metrics = {**REMOVAL_METRICS,
               "started_from": {"name": "my-org/base", "local_path": "/data/my-org/base"},  # local when it trained
               "trained_on": {"name": "corpora/web.jsonl", "local_path": "/data/corpora"}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    source = find_source(run)
    assert card.base_model(source) is None and card.datasets(source) == []
    metrics.update(started_from={"name": "gpt2", "local_path": None}, trained_on={"name": "HuggingFaceFW/fineweb", "local_path": None})
    (run / "metrics.json").write_text(json.dumps(metrics))
    source = find_source(run)
    assert card.base_model(source) == "gpt2" and card.datasets(source) == ["HuggingFaceFW/fineweb"]
    assert main(["publish", str(run), "--repo-id", REPO, "--dry-run", str(tmp_path / "out")]) == 0
    assert front_matter((tmp_path / "out" / "README.md").read_text())["base_model"] == "gpt2"


@pytest.mark.slow
def test_the_card_says_when_a_run_was_resumed_with_changed_settings(tmp_path):
    run = make_run(tmp_path / "run", verify=False)
    record = {"step": 60, "checkpoint": "x", "changes": {"model.init_args.lr": [0.001, 0.002]},
              "note": "the optimizer state (lr, betas, weight decay) and the learning-rate schedule came from the checkpoint"}
    (run / "metrics.json").write_text(json.dumps({**REMOVAL_METRICS, "resumed_with_changes": [record]}))
    assert main(["publish", str(run), "--repo-id", REPO, "--dry-run", str(tmp_path / "out")]) == 0
    assert ("The run was resumed at step 60 with changed settings (`model.init_args.lr` 0.001 -> 0.002; the optimizer "
            "state (lr, betas, weight decay) and the learning-rate schedule came from the checkpoint): `recipe.yaml` holds "
            "the settings after the change") in (tmp_path / "out" / "README.md").read_text()


def test_result_rows_of_ln_tuning_and_xatl_runs():
    ln_tune = {"steps": 150, "val": {"loss": 3.8950947, "perplexity": 49.16, "tokens": 11220},
               "ln_tune": {"selection": "fisher", "trainable": 230, "ln_entries": 2304, "val_before": {"loss": 3.9045243}}}
    rows = dict(card.result_rows(ln_tune, {}))
    assert rows["validation loss (nats/token)"] == "3.8951"
    assert rows["validation loss before tuning (nats/token)"] == "3.9045"
    assert rows["trainable LayerNorm entries (fisher)"] == "230 of 2,304"
    xatl = {"steps": 300, "val": {"loss": 4.1, "perplexity": 60.3}, "xatl": {"mixer": "mamba", "transfer": ["embeddings", "mlp"],
            "transferred_params": 123456, "frozen_tensors": 10, "unfrozen_at": 100}}
    compare = {"total_steps": 300, "scratch_final_val_loss": 4.3210987, "xatl_final_val_loss": 4.1,
               "steps_to_match_scratch_final_loss": 120, "steps_to_match_ratio": 0.4}
    rows = dict(card.result_rows(xatl, compare))
    assert rows["mixer / transferred components"] == "mamba / embeddings, mlp"
    assert rows["XATL steps to reach scratch's final loss"] == "120 of 300 (ratio 0.4000)"
    assert rows["scratch final validation loss (nats/token)"] == "4.3211"
    classify = {"method": "ln", "trainable": 10754, "test_accuracy": 0.818, "steps": 125}
    assert dict(card.result_rows(classify, {}))["test accuracy (ln)"] == "81.8%"


def load_in_process(folder, tokens, auto):
    """Stands in for the subprocess load of surgery.publish.check (tested in the fixture above), to save time."""
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(tokens).logits


def test_bare_model_directory(tmp_path, monkeypatch):
    import surgery.publish.check as check

    monkeypatch.setattr(check, "plain_transformers_logits", load_in_process)
    save_model(tmp_path / "bare", ln_free=False)
    result = publish(tmp_path / "bare", REPO, dry_run=tmp_path / "out")
    assert set(result["files"]) == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                                    "tokenizer.json", "tokenizer_config.json"}
    text = (tmp_path / "out" / "README.md").read_text()
    assert "## Results" not in text and "ln-free" not in front_matter(text)["tags"]
    assert result["checks"]["max_abs_logit_diff"] <= 1e-5 and result["checks"]["lens_max_abs_logit_diff"] < 1e-4


def test_mismatching_folder_is_refused_and_removed(tmp_path, monkeypatch):
    import surgery.publish.check as check

    run = make_run(tmp_path / "run", verify=False)
    monkeypatch.setattr(check, "plain_transformers_logits", lambda *a: load_in_process(*a) + 0.1)
    with pytest.raises(SurgeryError, match="logits differ from the run's model by up to 0.1.*nothing was published"):
        publish(run, REPO, dry_run=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(["publish", *args])
    return rc, capsys.readouterr().err


def test_unfinished_run_is_refused(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    rc, err = run_cli(capsys, str(tmp_path / "run"), "--repo-id", REPO, "--dry-run", str(tmp_path / "out"))
    assert rc == 2
    assert "is not a finished run: model/config.json and metrics.json missing" in err and "--ckpt_path last" in err
    assert not (tmp_path / "out").exists()


def test_other_refusals(tmp_path, capsys):
    rc, err = run_cli(capsys, str(tmp_path / "nowhere"), "--repo-id", REPO, "--dry-run", str(tmp_path / "out"))
    assert rc == 2 and "is not a directory: pass a finished run directory" in err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    rc, err = run_cli(capsys, str(tmp_path / "bin"), "--repo-id", REPO, "--dry-run", str(tmp_path / "out"))
    assert rc == 2 and "has no .safetensors weights (it has only .bin weights: re-save it" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    run = make_run(tmp_path / "run", verify=False)
    rc, err = run_cli(capsys, str(run), "--repo-id", REPO, "--dry-run", str(tmp_path / "full"))
    assert rc == 2 and "the directory exists and is not empty" in err
    rc, err = run_cli(capsys, str(run), "--repo-id", REPO, "--verify", str(tmp_path / "full"), "--dry-run", str(tmp_path / "o"))
    assert rc == 2 and "no report.json there" in err


@pytest.mark.parametrize("repo_id, why", [("no-owner", "expected OWNER/NAME"), ("me/bad name!", "invalid repo id"),
                                          ("a/b/c", "invalid repo id"), ("me/--x--", "invalid repo id")])
def test_invalid_repo_id(tmp_path, capsys, repo_id, why):
    rc, err = run_cli(capsys, str(tmp_path), "--repo-id", repo_id, "--dry-run", str(tmp_path / "out"))
    assert rc == 2 and why in err and repo_id in err


def test_xatl_hybrid_is_checked_in_process_and_its_card_says_import_surgery(tmp_path):
    from transformers import GPT2Config

    from publish_runs import tiny_tokenizer
    from surgery.xatl.hybrid.model import HybridGPT2LMHeadModel, hybrid_config_from

    torch.manual_seed(0)
    config = hybrid_config_from(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64), "retention", None, [1])
    HybridGPT2LMHeadModel(config).save_pretrained(tmp_path / "hybrid")
    tiny_tokenizer().save_pretrained(tmp_path / "hybrid")
    result = publish(tmp_path / "hybrid", REPO, dry_run=tmp_path / "out")
    assert result["checks"]["loader"] == "with `transformers.AutoModelForCausalLM` after `import surgery.xatl`"
    assert result["checks"]["max_abs_logit_diff"] == 0.0 and "lens_max_abs_logit_diff" not in result["checks"]
    text = (tmp_path / "out" / "README.md").read_text()
    assert "import surgery.xatl  # pip install lm-surgery" in text and "load_hooked" not in text
