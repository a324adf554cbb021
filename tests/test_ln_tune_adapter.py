"""Fine-tuning runs as PEFT adapters: a process that imports torch, transformers and peft only (never `surgery`)
loads `PeftModel.from_pretrained(base, adapter)` and gets the run's logits back.

Tolerance: 1e-6 absolute on logits of order 1-10. The adapter holds copies of the very tensors the run trained and
PEFT runs the same modules on them, so the logits agree to the last bit in practice; the margin only allows a
kernel choosing another summation order in the other process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surgery.cli.entry import main
from surgery.ln_tune import EntryMask, ln_parameters, save_adapter
from surgery.ln_tune.adapter import trained_norms
from surgery.ln_tune.methods import prepare
from ln_tune_models import padded_batch, tiny_bert, tiny_gpt2
from remove_ln_models import tiny_model
from test_ln_tune_methods import steps

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "ln_tune"
TOLERANCE = 1e-6

RELOAD = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
out = {}
for case in json.loads(sys.argv[1]):
    cls = AutoModelForSequenceClassification if case["classify"] else AutoModelForCausalLM
    model = PeftModel.from_pretrained(cls.from_pretrained(case["base"]), case["adapter"]).eval()
    batch = torch.load(case["batch"])
    with torch.no_grad():
        logits = model(**batch).logits
    out[case["adapter"]] = (logits - torch.load(case["logits"])).abs().max().item()
assert not any(name == "surgery" or name.startswith("surgery.") for name in sys.modules)
print(json.dumps(out))
"""


def reload_max_diffs(cases: list[dict]) -> dict[str, float]:
    """Max |logit difference| per adapter, computed in a fresh Python that never imports surgery."""
    done = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tuned_case(tmp_path: Path, name: str, model, method: str, batch: dict, **kw) -> dict:
    """Save `model` as the base, fine-tune a copy with `method` for 3 steps, save its adapter and its logits."""
    classify = "labels" in batch and batch["labels"].ndim == 1
    model.save_pretrained(tmp_path / name / "base")
    trained, mask = prepare(model, method, head="auto" if classify else None, **kw)
    steps(trained, batch, mask=mask)
    if mask is not None:
        mask.remove_hooks()
    trained.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.save(trained(**inputs).logits, tmp_path / name / "logits.pt")
    torch.save(inputs, tmp_path / name / "batch.pt")
    norms = "attn" if method == "ln-attn" else "all"
    save_adapter(trained, tmp_path / name / "adapter", norms=norms, mask=mask, head="auto" if classify else None)
    return {"base": str(tmp_path / name / "base"), "adapter": str(tmp_path / name / "adapter"), "classify": classify,
            "batch": str(tmp_path / name / "batch.pt"), "logits": str(tmp_path / name / "logits.pt")}


def lm_batch() -> dict:
    ids = torch.randint(1, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.slow
def test_every_kind_of_run_reloads_with_plain_peft(tmp_path):
    """ln (GPT-2), ln-attn (Llama RMSNorm), a random 10% of entries (GPT-NeoX), ln-attn and ln+lora on a BERT
    classifier (head as modules_to_save), ln+prefix (GPT-2): each reloaded by plain PEFT with the run's logits."""
    cases = [tuned_case(tmp_path, "gpt2-ln", tiny_gpt2(), "ln", lm_batch()),
             tuned_case(tmp_path, "llama-ln-attn", tiny_model("llama"), "ln-attn", lm_batch()),
             tuned_case(tmp_path, "neox-random", tiny_model("neox"), "ln-random", lm_batch(), fraction=0.1, seed=3),
             tuned_case(tmp_path, "bert-ln-attn", tiny_bert(), "ln-attn", padded_batch()),
             tuned_case(tmp_path, "bert-ln+lora", tiny_bert(), "ln+lora", padded_batch()),
             tuned_case(tmp_path, "gpt2-ln+prefix", tiny_gpt2(), "ln+prefix", lm_batch())]
    diffs = reload_max_diffs(cases)
    assert len(diffs) == len(cases) and all(d <= TOLERANCE for d in diffs.values()), diffs


def test_a_subset_adapter_is_a_full_norm_copy_equal_to_the_base_outside_the_mask(tmp_path):
    base = tiny_model("neox")
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    g = torch.Generator().manual_seed(1)
    picked = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in ln_parameters(base).items()}
    for n in ("gpt_neox.layers.0.input_layernorm.weight", "gpt_neox.final_layer_norm.bias"):  # two of the five norms
        picked[n] = torch.rand(original[n].shape, generator=g) < 0.25
    trained, mask = prepare(base, "ln-mask", head=None, mask=EntryMask(picked))
    steps(trained, lm_batch(), mask=mask)
    save_adapter(trained, tmp_path, mask=mask, head=None)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    touched = trained_norms(trained, mask=mask)
    assert touched == ["gpt_neox.layers.0.input_layernorm", "gpt_neox.final_layer_norm"]  # the others left out
    for key, value in saved.items():
        module, param = key.rsplit(".", 1)
        name = next(n for n in touched if module.startswith(f"base_model.model.{n}."))
        m = mask.masks[f"{name}.{param}"]
        assert value.shape == original[f"{name}.{param}"].shape
        assert torch.equal(value[~m], original[f"{name}.{param}"][~m]), key
        assert (value[m] != original[f"{name}.{param}"][m]).all(), key
    assert {k.rsplit(".", 1)[0].split(".ln_tuning_layers")[0] for k in saved} == {f"base_model.model.{n}" for n in touched}


@pytest.mark.slow
def test_recipe_run_writes_an_adapter_with_the_exported_models_logits(tiny_lm_dir, tmp_path):
    """`surgery fit` with method ln-attn and a Fisher subset: <run>/adapter on the base gives <run>/model's logits."""
    run = tmp_path / "run"
    args = ["fit", "--config", str(RECIPES / "tiny-gpt2-email.yaml"), "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
            "--model.init_args.init", str(tiny_lm_dir), "--model.init_args.method", "ln-attn",
            "--model.init_args.selection", "fisher", "--model.init_args.fisher_samples", "4",
            "--model.init_args.lr", "0.05", "--model.init_args.warmup_steps", "1", "--data.init_args.tokenizer",
            str(tiny_lm_dir), "--data.init_args.part", "json", "--data.init_args.block_size", "32",
            "--data.init_args.batch_size", "4", "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ln_tune"]["method"] == "ln-attn" and metrics["ln_tune"]["ln_entries"] == 2 * 2 * 32
    assert EntryMask.load(run / "masks.safetensors").selected() == metrics["ln_tune"]["trainable"] == 13
    exported = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    batch = {"input_ids": torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))}
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(exported(**batch).logits, tmp_path / "logits.pt")
    case = {"base": str(tiny_lm_dir), "adapter": str(run / "adapter"), "classify": False,
            "batch": str(tmp_path / "batch.pt"), "logits": str(tmp_path / "logits.pt")}
    assert reload_max_diffs([case])[str(run / "adapter")] <= TOLERANCE
