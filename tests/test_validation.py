"""The table of bad inputs to `surgery fit`: each one is refused before training with exit status 2 and a
message naming the key or file, the bad value and the fix. Runs on the tiny removal recipe of
`reliability_setup` (each case ~1 s)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from reliability_setup import fit_args, write_setup
from surgery.cli.entry import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    write_setup(root, dropout=0.0)
    return root


def recipe_with(root: Path, tmp: Path, **sections) -> str:
    """A copy of the tiny recipe with whole sections replaced or keys merged (`model_init_args={...}`)."""
    recipe = yaml.safe_load((root / "recipe.yaml").read_text())
    for key, value in sections.items():
        if key == "model_init_args":
            recipe["model"]["init_args"].update(value)
        else:
            recipe[key] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def model_dir(root: Path, tmp: Path, edit: Callable[[Path], None]) -> str:
    """A copy of the init model directory, changed by `edit`."""
    import shutil

    path = tmp / "init"
    shutil.copytree(root / "init", path)
    edit(path)
    return str(path)


def tiny_model(tmp: Path, kind: str) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, word_embed_proj_dim=16,
                                         num_attention_heads=2, vocab_size=4096))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1000, n_positions=64))
    model.save_pretrained(tmp / kind)
    return str(tmp / kind)


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def fake_checkpoint(path: Path, **drop) -> str:
    """A minimal training checkpoint with the keys a resume needs (minus `drop`)."""
    ckpt = {"state_dict": {}, "loops": {}, "global_step": 3, "optimizer_states": [], "lr_schedulers": []}
    for k in drop:
        ckpt.pop(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return str(path)


def nan_weights(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


class Opaque:
    """Any class: pickled into a checkpoint, weights-only loading refuses it."""


@dataclass
class Case:
    id: str
    args: Callable[[Path, Path], list[str]]  # (root, tmp) -> extra CLI arguments
    expect: list[str]  # fragments of the message, all required
    run_dir: Callable[[Path], Path] = field(default=lambda tmp: tmp / "run")


def _run_dir_with(files: dict[str, str | None]) -> Callable[[Path], Path]:
    """A run directory holding the given files (None: a fake training checkpoint)."""
    def make(tmp: Path) -> Path:
        run = tmp / "run"
        for name, text in files.items():
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            fake_checkpoint(run / name) if text is None else (run / name).write_text(text)
        return run
    return make


def _xatl(mixer: str) -> Callable[[Path, Path], list[str]]:
    def args(root: Path, tmp: Path) -> list[str]:
        model = {"class_path": "surgery.xatl.training.module.XatlLM", "init_args": {"source": str(root / "init"), "mixer": mixer}}
        return ["--config", recipe_with(root, tmp, model=model)]
    return args


SCHEDULE_EVENTS = {"h.0.ln_2": 3, "h.5.ln_2": 4}

CASES = [
    # -- parsed by the Lightning CLI (jsonargparse): exit 2 with the parser's message --------------
    Case("unknown model key", lambda r, t: ["--model.init_args.lrr", "0.1"],
         ["surgery fit: error: model.init_args.lrr: no such key; did you mean model.init_args.lr? LNRemoval takes: init,"]),
    Case("unknown trainer key in YAML", lambda r, t: ["--config", recipe_with(r, t, trainer={"max_stepz": 3})],
         ["max_stepz"]),
    Case("unknown model class", lambda r, t: ["--model.class_path", "surgery.remove_ln.module.LNRemovl"],
         ["model.class_path: module 'surgery.remove_ln.module' has no attribute 'LNRemovl'"]),
    Case("unknown sigma source", lambda r, t: ["--model.init_args.sigma_source", "tabel"],
         ["model.init_args.sigma_source='tabel': expected one of 'moving_average', 'table'"]),
    Case("non-integer steps", lambda r, t: ["--trainer.max_steps", "ten"], ["trainer.max_steps='ten': expected int"]),
    Case("unknown guard action", lambda r, t: ["--guard.action", "explode"],
         ["guard.action='explode': expected one of 'skip', 'rollback', 'stop', 'off'"]),
    Case("typo two classes deep in YAML", lambda r, t: ["--config", recipe_with(r, t, model_init_args={"distill": {"kl_weigth": 1.0}})],
         ["error: model.init_args.distill.kl_weigth: no such key; did you mean model.init_args.distill.kl_weight? "
          "DistillConfig takes: lm_weight, kl_weight,"]),
    Case("wrong type two classes deep in YAML", lambda r, t: ["--config", recipe_with(r, t, model_init_args={"schedule": {"gaps": "abc"}})],
         ["error: model.init_args.schedule.gaps='abc': expected dict"]),
    Case("wrong tuple length", lambda r, t: ["--model.init_args.betas", "[0.9]"],
         ["model.init_args.betas='[0.9]': expected tuple with 2 elements"]),
    Case("GPU accelerator without a GPU", lambda r, t: ["--trainer.accelerator", "gpu"] if not torch.cuda.is_available() else [
         "--trainer.max_steps", "0"], ["trainer.accelerator='gpu': this machine has no CUDA GPU that torch can use; set trainer.accelerator "
                                       "to cpu (or auto)"] if not torch.cuda.is_available() else ["trainer.max_steps=0"]),
    # -- model, family, mixer ----------------------------------------------------------------------
    Case("unknown mixer", _xatl("lstm"), ["unknown mixer 'lstm'; choose one of: gla, mamba, mamba2, retention"]),
    Case("steps end before the XATL unfreeze", lambda r, t: [*_xatl("gla")(r, t), "--model.init_args.unfreeze.step", "16"],
         ["trainer.max_steps=16 ends before model.init_args.unfreeze.step=16: the transferred weights would stay frozen for "
          "the whole run. Raise trainer.max_steps above 16, lower unfreeze.step, or set model.init_args.freeze false"]),
    Case("unknown model family", lambda r, t: ["--model.init_args.init", tiny_model(t, "opt")],
         ["model type 'opt' is not supported (supported: gemma3_text, gpt2, gpt_neox, llama, mistral, olmo2, qwen2, qwen3", "add a Family entry in surgery/families.py"]),
    Case("init path missing", lambda r, t: ["--model.init_args.init", str(t / "nowhere")],
         [f"model path '{'{tmp}'}/nowhere' does not exist; check the path"]),
    Case("init dir without config.json", lambda r, t: ["--model.init_args.init", model_dir(r, t, lambda p: (p / "config.json").unlink())],
         ["has no config.json: it is not a directory written by save_pretrained"]),
    Case("pickle-only weights", lambda r, t: ["--model.init_args.init", model_dir(r, t, lambda p: (
            (p / "model.safetensors").rename(p / "pytorch_model.bin")))],
         ["has no *.safetensors weights (only pytorch_model.bin, pickle-based files that can run code when loaded)",
          "surgery loads weights only from safetensors"]),
    Case("truncated safetensors", lambda r, t: ["--model.init_args.init", model_dir(r, t, lambda p: truncate(p / "model.safetensors"))],
         ["model.safetensors': its tensors need", "the file is truncated or corrupt: copy or download it again"]),
    Case("safetensors header cut", lambda r, t: ["--model.init_args.init", model_dir(r, t, lambda p: truncate(p / "model.safetensors", 0.0001))],
         ["model.safetensors': its header claims", "bytes but the file has"]),
    Case("NaN weights", lambda r, t: ["--model.init_args.init", model_dir(r, t, nan_weights)],
         ["init' has NaN or infinite weights in transformer.h.0.mlp.c_fc.weight: it cannot be trained or evaluated. "
          "Load an earlier checkpoint of it"]),
    Case("tokenizer larger than the model's vocabulary", lambda r, t: ["--model.init_args.init", tiny_model(t, "gpt2")],
         ["the tokenizer has 4096 entries but model", "embeds only 1000: set data.tokenizer to the model's own tokenizer"]),
    # -- removal schedule and steps ------------------------------------------------------------------
    Case("schedule names a missing layer", lambda r, t: ["--config", recipe_with(r, t, model_init_args={"schedule": {"events": SCHEDULE_EVENTS}})],
         ["schedule.events names ['h.5.ln_2'] and omits", "this 2-block model has exactly: h.0.ln_2, h.1.ln_2"]),
    Case("schedule with an unknown kind", lambda r, t: ["--config", recipe_with(r, t, model_init_args={"schedule": {"gaps": {"ln_3": 1}}})],
         ["schedule.gaps takes kinds ln_q, ln_k, ln_attn_out, ln_mlp_out, ln_2, ln_1_qk, ln_1_v, ln_f", "'ln_3': 1"]),
    Case("negative schedule start", lambda r, t: ["--model.init_args.schedule.start", "-2"], ["schedule.start >= 0 (got start=-2"]),
    Case("zero steps", lambda r, t: ["--trainer.max_steps", "0"],
         ["trainer.max_steps=0: a run needs at least one optimizer step; set a positive number of steps"]),
    Case("negative steps", lambda r, t: ["--trainer.max_steps", "-3"], ["trainer.max_steps=-3: a run needs at least one optimizer step"]),
    Case("zero epochs", lambda r, t: ["--trainer.max_steps", "-1", "--trainer.max_epochs", "0"],
         ["trainer.max_epochs=0: a run needs at least one epoch"]),
    Case("steps end before the schedule", lambda r, t: ["--trainer.max_steps", "10"],
         ["trainer.max_steps=10 ends before the removal schedule does (its last event is at step 14): the run needs "
          "trainer.max_steps >= 15"]),
    Case("negative checkpoint interval", lambda r, t: ["--checkpoint.every_n_train_steps", "-1"],
         ["checkpoint.every_n_train_steps=-1 is negative: use a positive number of steps, or 0"]),
    # -- optimizer and surgery settings -------------------------------------------------------------
    Case("negative learning rate", lambda r, t: ["--model.init_args.lr", "-0.001"],
         ["model.init_args.lr=-0.001: must be a positive learning rate"]),
    Case("min lr ratio above 1", lambda r, t: ["--model.init_args.min_lr_ratio", "2"],
         ["model.init_args.min_lr_ratio=2.0: must be the final lr as a share of the peak, between 0 and 1"]),
    Case("negative warm-up", lambda r, t: ["--model.init_args.warmup_steps", "-5"], ["model.init_args.warmup_steps=-5"]),
    Case("momentum of 1.5", lambda r, t: ["--model.init_args.momentum", "1.5"],
         ["model.init_args.momentum=1.5: must be a moving-average momentum in [0, 1)"]),
    Case("negative aux loss weight", lambda r, t: ["--model.init_args.aux_loss_weight", "-0.1"],
         ["model.init_args.aux_loss_weight=-0.1: must be a non-negative loss weight"]),
    Case("guard factor below 1", lambda r, t: ["--guard.factor", "0.5"], ["guard.factor=0.5: a spike threshold must exceed 1"]),
    Case("guard lr scale 0", lambda r, t: ["--guard.lr_scale", "0"], ["guard.lr_scale=0.0: must be in (0, 1]"]),
    # -- data ------------------------------------------------------------------------------------------
    Case("zero block size", lambda r, t: ["--data.init_args.block_size", "0"],
         ["data.block_size and data.batch_size must be positive (got 0, 8)"]),
    Case("one-token blocks", lambda r, t: ["--data.init_args.block_size", "1"],
         ["data.block_size=1: a block needs at least 2 tokens (each token is predicted from the ones before it); "
          "set data.init_args.block_size to 2 or more"]),
    Case("negative batch size", lambda r, t: ["--data.init_args.batch_size", "-1"],
         ["data.block_size and data.batch_size must be positive (got 32, -1)"]),
    Case("block size beyond the model's positions", lambda r, t: ["--data.init_args.block_size", "128"],
         ["data.init_args.block_size=128: the model has only 64 positions; set data.init_args.block_size to at most 64"]),
    Case("data path missing", lambda r, t: ["--data.init_args.data", str(t / "missing.jsonl")],
         ["data path", "missing.jsonl' does not exist; use 'stdlib', a local file or directory"]),
    Case("corpus empty after filtering", lambda r, t: (
            (t / "blank.jsonl").write_text("".join(json.dumps({"text": " \n\t "}) + "\n" for _ in range(50))),
            ["--data.init_args.data", str(t / "blank.jsonl")])[1],
         ["blank.jsonl' has 0 tokens, fewer than one block of 32"]),
    Case("empty validation split", lambda r, t: ["--data.init_args.val_fraction", "0.0"],
         ["the validation split of", "has 0 tokens, fewer than one block of 32: add text, lower data.block_size or raise data.val_fraction"]),
    # -- run directory and checkpoints ----------------------------------------------------------------
    Case("finished run directory", lambda r, t: [], ["holds a finished run", "metrics.json after 16 steps",
         "choose a new trainer.default_root_dir, pass --ckpt_path last to continue", "or --checkpoint.overwrite true"],
         run_dir=_run_dir_with({"metrics.json": json.dumps({"steps": 16})})),
    Case("interrupted run without auto-resume", lambda r, t: ["--checkpoint.auto_resume", "false"],
         ["last.ckpt exists: this run directory holds an interrupted run. Pass --ckpt_path last to resume it"],
         run_dir=_run_dir_with({"checkpoints/last.ckpt": None})),
    Case("checkpoint path missing", lambda r, t: ["--ckpt_path", str(t / "gone.ckpt")],
         ["gone.ckpt' does not exist: check --ckpt_path"]),
    Case("truncated checkpoint", lambda r, t: (truncate(Path(fake_checkpoint(t / "cut.ckpt"))), ["--ckpt_path", str(t / "cut.ckpt")])[1],
         ["cut.ckpt' is truncated or corrupt and cannot be resumed", "Delete it and resume from an earlier checkpoint"]),
    Case("checkpoint with pickled objects", lambda r, t: (
            torch.save({"state_dict": {}, "thing": Opaque()}, t / "obj.ckpt"), ["--ckpt_path", str(t / "obj.ckpt")])[1],
         ["obj.ckpt' holds Python objects that weights-only loading refuses", "load it in Python with torch.load(weights_only=False)"]),
    Case("weights-only checkpoint resumed", lambda r, t: ["--ckpt_path", fake_checkpoint(t / "w.ckpt", loops=1, optimizer_states=1)],
         ["w.ckpt' is not a training checkpoint (it lacks loops, optimizer_states)", "use model.init_args.init instead"]),
]


def run_cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_its_fix(case, root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(root / "cache"))
    extra = case.args(root, tmp_path)
    run_dir = case.run_dir(tmp_path)
    code = run_cli(fit_args(root / "recipe.yaml", run_dir, *extra))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists() or case.id == "interrupted run without auto-resume"
    for fragment in case.expect:
        assert fragment.replace("{tmp}", str(tmp_path)) in err, err[-2000:]


def test_table_size():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
