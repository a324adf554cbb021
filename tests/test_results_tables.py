"""What a user sees when a run ends and on its model card: the results table of every surgery leads with the gap to
the model it started from (removal: then the bracket gap LN-free - min(original, control), then the gap to the
control), gives both losses and the validation tokens behind them, and the card repeats the same rows from
metrics.json."""

import json

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from publish_runs import REMOVAL_METRICS, make_run
from reliability_setup import QUIET, ROOT, fit_args, write_setup
from surgery.cli.entry import main
from surgery.publish import card, find_source
from surgery.training.report import count_row, gap_rows, gaps

# The user's removal run: the control fine-tune ended above the original, so the gap to the control (+0.0323)
# hid most of the cost (+0.0499 to the original, which is also the bracket gap).
USER_RUN = {**REMOVAL_METRICS, "val_loss": {"original": 3.7050, "control (LN kept)": 3.7226, "LN-free": 3.7549},
            "val_tokens": {"original": 8160, "control (LN kept)": 8160, "LN-free": 8160},
            "gap_vs_original": 0.0499, "gap_vs_control": 0.0323, "gap_vs_best": 0.0499}
GAP_ROWS = ["| gap LN-free - original (nats/token) | +0.0499 |",
            "| gap LN-free - min(original, control) (nats/token) | +0.0499 |",
            "| gap LN-free - control (nats/token) | +0.0323 |"]


def results_section(readme: str) -> list[str]:
    """The rows of the card's Results table, in order."""
    section = readme.split("## Results")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]


def table_lines(out: str, title: str) -> list[str]:
    """The body rows of the rich table titled `title` in printed output, as 'label | value'."""
    text = out[out.index(title):]
    rows = []
    for line in text.splitlines()[4:]:
        if not line.startswith("│"):
            break
        rows.append(" | ".join(cell.strip() for cell in line.strip("│").split("│")))
    return rows


def card_text(run, metrics: dict) -> str:
    (run / "metrics.json").write_text(json.dumps(metrics))
    source = find_source(run)
    meta = card.metadata(source, ln_free=True, license="mit", base=None, data=[])
    checks = {"loader": "in a process without `surgery`", "blocks": 2, "block_size": 32, "max_abs_logit_diff": 0.0}
    return card.render(source, "me/tiny", meta, checks, ["README.md", "model.safetensors"], "AutoModelForCausalLM", False)


def test_removal_card_leads_with_the_gap_to_the_original_and_the_bracket_gap(tmp_path):
    run = make_run(tmp_path / "run", verify=False)
    rows = results_section(card_text(run, USER_RUN))
    assert rows[:3] == GAP_ROWS
    assert rows[3:7] == ["| validation loss, original (nats/token) | 3.7050 |",
                         "| validation loss, control (LN kept) (nats/token) | 3.7226 |",
                         "| validation loss, LN-free (nats/token) | 3.7549 |",
                         "| validation tokens behind each loss | 8,160 |"]


def test_older_removal_metrics_get_their_missing_gaps_from_the_losses(tmp_path):
    """REMOVAL_METRICS records gap_vs_control alone (as runs did before the bracket gap) and no val_tokens."""
    run = make_run(tmp_path / "run", verify=False)
    rows = results_section(card_text(run, REMOVAL_METRICS))
    assert rows[:3] == ["| gap LN-free - original (nats/token) | -0.5111 |",
                        "| gap LN-free - min(original, control) (nats/token) | +0.0444 |",
                        "| gap LN-free - control (nats/token) | +0.0444 |"]
    assert "| validation tokens behind each loss | LN-free 8,160; original, control (LN kept): not recorded |" in rows


def test_gap_helpers():
    assert gaps(3.7549, 3.7050, 3.7226) == pytest.approx({"gap_vs_original": 0.0499, "gap_vs_control": 0.0323,
                                                          "gap_vs_best": 0.0499})
    assert gap_rows({"gap_vs_original": 0.2, "gap_vs_best": 0.2}, "hybrid", "source") == [
        ("gap hybrid - source (nats/token)", "+0.2000")]  # no control: no bracket row, it would repeat the first
    assert gap_rows({"gap_vs_original": None}, "tuned", "before tuning") == []
    assert count_row({"a": None}) == []
    assert count_row({"a": 10, "b": 12}) == [("validation tokens behind each loss", "a 10; b 12")]


def test_removal_run_prints_the_gaps_first_and_records_the_tokens(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    recipe = write_setup(tmp_path, dropout=0.0)
    assert main(fit_args(recipe, tmp_path / "run", "--model.init_args.control", "true")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    n = metrics["val"]["tokens"]
    assert n > 0 and metrics["val_tokens"] == {"original": n, "control (LN kept)": n, "LN-free": n}
    rows = table_lines(capsys.readouterr().out, "LayerNorm removal: results")
    assert rows[:3] == [f"gap LN-free - original (nats/token) | {metrics['gap_vs_original']:+.4f}",
                        f"gap LN-free - min(original, control) (nats/token) | {metrics['gap_vs_best']:+.4f}",
                        f"gap LN-free - control (nats/token) | {metrics['gap_vs_control']:+.4f}"]
    assert f"validation tokens behind each loss | {n:,}" in rows
    assert rows == [" | ".join(r) for r in card.surgery_rows(metrics)]  # the card shows what the run printed


def xatl_recipe(root, **model) -> str:
    """The tiny GPT-2 of write_setup as the source of a GLA hybrid, 4 steps on its corpus."""
    recipe = yaml.safe_load(write_setup(root, dropout=0.0).read_text())
    recipe.pop("checkpoint")
    recipe["trainer"]["max_steps"] = 4
    recipe["model"] = {"class_path": "surgery.xatl.training.module.XatlLM", "init_args": {
        "source": str(root / "init"), "mixer": "gla", "mixer_config": {"key_dim": 32, "gate_rank": 4, "chunk": 16},
        "attn_layers": [1], "transfer": ["embeddings", "norms", "mlp", "lm_head", "attn_layers"],
        "lr": 1e-3, "warmup_steps": 1, **model}}
    path = root / "xatl.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("unfreeze, says", [({"step": 2, "warmup_steps": 1}, "at step 2"),
                                            ({"step": None, "threshold": None}, "never: frozen as copied for the whole run")])
def test_xatl_run_prints_source_hybrid_gap_layers_and_unfreezing(tmp_path, capsys, monkeypatch, unfreeze, says):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    recipe = xatl_recipe(tmp_path, unfreeze=unfreeze)
    assert main(["fit", "--config", recipe, "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    x, val = metrics["xatl"], metrics["val"]
    assert x["source_val_tokens"] == val["tokens"] > 0
    assert x["gap_vs_source"] == pytest.approx(val["loss"] - x["source_val_loss"])
    rows = table_lines(capsys.readouterr().out, "Cross-architecture transfer: results")
    assert rows[:4] == [f"gap hybrid - source (nats/token) | {x['gap_vs_source']:+.4f}",
                        f"validation loss, source (nats/token) | {x['source_val_loss']:.4f}",
                        f"validation loss, hybrid (nats/token) | {val['loss']:.4f}",
                        f"validation tokens behind each loss | {val['tokens']:,}"]
    assert "softmax attention kept at layers | 1" in rows and f"transferred weights unfrozen | {says}" in rows
    card_rows = dict(card.result_rows(metrics, {}))
    assert card_rows["gap hybrid - source (nats/token)"] == f"{x['gap_vs_source']:+.4f}"
    assert card_rows["validation tokens behind each loss"] == f"{val['tokens']:,}"
    assert card_rows["transferred weights unfrozen"] == says


def test_xatl_card_rows_say_how_the_layers_were_chosen_and_when_nothing_was_frozen():
    base = {"val": {"loss": 4.1, "perplexity": 60.3, "tokens": 500},
            "xatl": {"mixer": "gla", "transfer": ["embeddings"], "source_val_loss": 3.9, "gap_vs_source": 0.2,
                     "source_val_tokens": 500, "transferred_params": 10, "frozen_tensors": 0, "unfrozen_at": 0,
                     "attn_layers": [], "attn_layer_criterion": None}}
    rows = card.result_rows(base, {})
    assert rows[0] == ("gap hybrid - source (nats/token)", "+0.2000")
    assert dict(rows)["softmax attention kept at layers"] == "none (a mixer in every block)"
    assert dict(rows)["transferred weights unfrozen"] == "never frozen (freeze: false)"
    auto = {**base, "xatl": {**base["xatl"], "attn_layers": [2], "attn_layer_criterion": "kl", "transfer": []}}
    rows = dict(card.result_rows(auto, {}))
    assert rows["softmax attention kept at layers"] == "2 (auto, ranked by kl)"
    assert rows["transferred weights unfrozen"] == "nothing transferred (trained from scratch)"


RECIPES = ROOT / "recipes" / "ln_tune"


def test_ln_tuning_run_prints_the_loss_before_and_after_and_the_gap(tiny_lm_dir, tmp_path, capsys):
    args = ["fit", "--config", str(RECIPES / "tiny-gpt2-email.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
            "--model.init_args.init", str(tiny_lm_dir), "--model.init_args.warmup_steps", "1",
            "--data.init_args.tokenizer", str(tiny_lm_dir), "--data.init_args.part", "json",
            "--data.init_args.block_size", "32", "--data.init_args.batch_size", "4", *QUIET]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    tune, val = metrics["ln_tune"], metrics["val"]
    before = tune["val_before"]
    assert tune["gap_vs_before"] == pytest.approx(val["loss"] - before["loss"])
    assert before["tokens"] == val["tokens"] > 0
    rows = table_lines(capsys.readouterr().out, "LN-tuning: results")
    assert rows[:4] == [f"gap tuned - before tuning (nats/token) | {tune['gap_vs_before']:+.4f}",
                        f"validation loss before tuning (nats/token) | {before['loss']:.4f}",
                        f"validation loss (nats/token) | {val['loss']:.4f}",
                        f"validation tokens behind each loss | {val['tokens']:,}"]
    card_rows = card.result_rows(metrics, {})
    assert [" | ".join(r) for r in card_rows[:4]] == rows[:4]


@pytest.mark.slow
def test_classification_run_prints_accuracy_before_and_after_and_the_gap(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    args = ["fit", "--config", str(RECIPES / "minilm-sentiment.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--model.init_args.init", str(tmp_path / "bert"), "--model.init_args.method", "ln",
            "--data.init_args.max_train", "32", "--data.init_args.max_test", "32", "--data.init_args.sources", "[tweets]",
            "--data.init_args.batch_size", "16", *QUIET]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, test = metrics["test_before"], metrics["test"]
    assert before["examples"] == test["examples"] == 32
    assert metrics["test_accuracy"] == round(test["accuracy"], 4)
    assert metrics["gap_vs_before"]["accuracy"] == pytest.approx(test["accuracy"] - before["accuracy"])
    rows = table_lines(capsys.readouterr().out, "LN-tuning (sequence classification): results")
    gap = 100 * metrics["gap_vs_before"]["accuracy"]
    assert rows[:3] == [f"gap tuned - before tuning (test accuracy, points) | {gap:+.1f}",
                        f"test accuracy before tuning | {100 * before['accuracy']:.1f}%",
                        f"test accuracy (ln) | {100 * metrics['test_accuracy']:.1f}%"]
    assert "test examples behind each figure | 32" in rows
    assert [" | ".join(r) for r in card.surgery_rows(metrics)] == rows
