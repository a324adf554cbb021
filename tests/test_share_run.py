"""A shared-depth recipe end to end: `surgery fit` on a tiny 4-layer model, its metrics, its two exports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from reliability_setup import QUIET, fit_subprocess, write_setup
from transformers import AutoModelForCausalLM

import surgery  # noqa: F401  (registers the shared_* model types)

RECIPE = "recipes/share/gpt2.yaml"

# Loads the vanilla expansion in a process where `surgery` cannot be imported and prints its logits' sum of squares
# and first entries; the test compares them with the shared model's, loaded through the Auto classes.
PLAIN = """
import sys, torch
sys.modules["surgery"] = None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([list(range(3, 27))])
with torch.no_grad():
    print(type(m).__name__, *m(ids).logits[0, :, :4].flatten().tolist())
"""


@pytest.mark.slow
def test_recipe_runs_and_both_exports_reload(tmp_path):
    setup = tmp_path / "setup"
    write_setup(setup, dropout=0.0)
    init = AutoModelForCausalLM.from_pretrained(setup / "init")
    init.config.n_layer = 4  # the shipped recipe's layout (cycle:2) needs 4 layers
    four = type(init)(init.config)
    four.save_pretrained(setup / "init")
    run = tmp_path / "run"
    args = ["fit", "--config", RECIPE, "--trainer.default_root_dir", str(run), *QUIET,
            "--model.init_args.init", str(setup / "init"), "--data.init_args.tokenizer", str(setup / "init"),
            "--data.init_args.data", str(setup / "corpus.jsonl"), "--data.init_args.block_size", "32",
            "--data.init_args.val_fraction", "0.2", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--checkpoint.every_n_train_steps", "2",
            "--model.init_args.share.norms", "shared", "--model.init_args.share.relax_rank", "2"]
    done = fit_subprocess(args, tmp_path / "cache", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Shared depth: results" in done.stdout and "unique parameters, shared / original" in done.stdout
    m = json.loads((run / "metrics.json").read_text())
    s = m["share"]
    assert s["gap_vs_original"] == pytest.approx(m["val"]["loss"] - s["original_val_loss"])
    assert s["unique_params"] < s["original_params"] and s["blocks"] == [0, 1, 0, 1]
    assert s["expanded_logit_diff"] < 1e-4

    shared = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert type(shared).__name__ == "SharedGPT2LMHeadModel"
    plain = subprocess.run([sys.executable, "-c", PLAIN, str(run / "model-expanded")], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    name, *values = plain.stdout.split()
    assert name == "GPT2LMHeadModel"
    with torch.no_grad():
        ours = shared(torch.tensor([list(range(3, 27))])).logits[0, :, :4].flatten()
    # the expansion adds each layer's low-rank delta into its weight: float32 rounding, ~1e-6 on logits of order 1
    torch.testing.assert_close(torch.tensor([float(v) for v in values]), ours, atol=1e-4, rtol=1e-4)
