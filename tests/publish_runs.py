"""Tiny fake run directories for the publish tests: what `surgery fit` of an LN-removal run leaves behind
(model/ with an LN-free GPT-2 and a tokenizer, metrics.json with the removal report's keys, logs/config.yaml,
a plot) plus a `surgery verify` report. Numbers in metrics.json are distinctive so the card can be checked."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lens_models import make_ln_free, tiny_gpt2

REMOVAL_METRICS = {
    "steps": 120,
    "tokens_seen": 245760,
    "train_time_s": 287.1,
    "val": {"loss": 4.0567891, "perplexity": 57.8, "tokens": 8160},
    "val_loss": {"original": 4.5678912, "control (LN kept)": 4.0123456, "LN-free": 4.0567891},
    "gap_vs_control": 0.0444435,
    "export_logit_diff": {"max_abs": 5.7220458984375e-06, "relative": 3.98758823286638e-07},
    "removed": [{"step": 20, "point": "h.0.ln_2", "sigma": 0.0645}, {"step": 100, "point": "ln_f", "sigma": 0.918}],
    "plots": ["runs/fake/loss.png"],
}
VERIFY_RESULT = {
    "has_normalization": False, "hf_scale_spread": 1.48e-13, "hf_tl_max_abs_logit_diff": 9.53e-06,
    "dla_relative_error": 1.2135e-07, "dla_frozen_scale_error": 1.73e-15,
    "patching": {"correlation": 0.987654}, "validation": {"loss": 4.0567891},
}
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")


def tiny_tokenizer(vocab: int = 64):
    """A word-level fast tokenizer with `vocab` entries ("[UNK]", "w1", ..., "w63"), eos "w1"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w1")


def save_model(path: Path, ln_free: bool = True, seed: int = 0) -> Path:
    model = tiny_gpt2(seed=seed)
    if ln_free:
        make_ln_free(model)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_run(root: Path, init: str = "gpt2", data: str = "stdlib", verify: bool = True, ln_free: bool = True) -> Path:
    """A finished fake removal run under `root`; `init` / `data` go into the recipe (model.init_args.init, data.init_args.data)."""
    root.mkdir(parents=True, exist_ok=True)
    save_model(root / "model", ln_free=ln_free)
    (root / "metrics.json").write_text(json.dumps(REMOVAL_METRICS, indent=2))
    (root / "logs").mkdir()
    recipe = {"seed_everything": 0, "trainer": {"max_steps": 120, "default_root_dir": str(root)},
              "model": {"class_path": "surgery.remove_ln.module.LNRemoval", "init_args": {"init": init, "aux_loss_weight": 0.1}},
              "data": {"class_path": "surgery.data.TokenBlocks", "init_args": {"data": data, "block_size": 64}}}
    (root / "logs" / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "loss.png").write_bytes(PNG)
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.ckpt").write_bytes(b"not published")
    if verify:
        (root / "verify").mkdir()
        baseline = {**VERIFY_RESULT, "has_normalization": True, "dla_relative_error": 0.8875, "hf_scale_spread": 0.604}
        report = {"validation_blocks": 8, "block_size": 64, "failures": [],
                  "results": {"model (LN-free)": VERIFY_RESULT, "baseline (with LN)": baseline}}
        (root / "verify" / "report.json").write_text(json.dumps(report))
        (root / "verify" / "report.md").write_text("# surgery verify\n")
    return root
