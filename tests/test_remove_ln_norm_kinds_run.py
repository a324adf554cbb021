"""A whole removal run through `surgery fit` on tiny random Qwen3, Gemma 3 and OLMo 2 models (a control twin and the
original as a teacher), then `surgery verify` on the export: every point kind goes in schedule order, the export is
the family's vanilla class and passes the LN-free gates."""

import json
import os

import pytest
import torch
import yaml
from transformers import AutoTokenizer

import norm_family_models
from norm_family_models import KINDS, tiny_norm_family
from reliability_setup import fit_args, write_setup
from surgery.cli.entry import main
from surgery.families import family_of
from surgery.remove_ln.points import family_kinds


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fit_removes_every_kind_in_order_and_the_export_verifies(kind, tmp_path, monkeypatch):
    recipe_path = write_setup(tmp_path, dropout=0.0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "init")
    monkeypatch.setitem(norm_family_models.COMMON, "vocab_size", len(tok))
    model = tiny_norm_family(kind)
    model.save_pretrained(tmp_path / "init")
    kinds = family_kinds(family_of(model))
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model"]["init_args"].update(
        schedule={"start": 2, "gaps": {k: 1 for k in kinds}}, control=True,
        distill={"lm_weight": 0.5, "kl_weight": 1.0})
    recipe["trainer"]["max_steps"] = 4 + 2 * len(kinds) + 1
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    os.environ["SURGERY_CACHE"] = str(tmp_path / "cache")
    run = tmp_path / "run"
    assert main(fit_args(recipe_path, run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    order = [r["point"].rsplit(".", 1)[-1] for r in metrics["removed"]]
    assert order == sorted(order, key=kinds.index) and len(order) == 2 * (len(kinds) - 1) + 1
    assert metrics["export_logit_diff"]["relative"] < 1e-4
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architectures"] == [family_of(model).hf_architecture]
    assert main(["verify", str(run / "model"), "--baseline", str(tmp_path / "init"), "--out", str(tmp_path / "verify"),
                 "--data", str(tmp_path / "corpus.jsonl"), "--block-size", "32", "--val-blocks", "2",
                 "--dla-blocks", "1", "--prompts", "2", "--seg-len", "8"]) == 0
    report = json.loads((tmp_path / "verify" / "report.json").read_text())
    assert torch.tensor([report["results"][name]["hf_tl_max_abs_logit_diff"] for name in report["results"]]).max() < 1e-4
