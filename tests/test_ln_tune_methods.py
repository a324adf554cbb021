"""LN-tuning in attention (`ln-attn`) and LN-tuning combined with LoRA and prefix-tuning (PEFT): each method trains
exactly its intended parameters, every other parameter stays bit-identical after optimizer steps with weight decay."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from surgery.errors import SurgeryError
from surgery.families import block_part_paths
from surgery.ln_tune import LNTuneConfig, ln_tune, trainable_parameters
from surgery.ln_tune.lm import LNTuneLM
from surgery.ln_tune.methods import prepare
from ln_tune_models import padded_batch, tiny_bert, tiny_gpt2
from remove_ln_models import tiny_model

D = 32  # width of every tiny model here
# Written out here, not read from surgery.families: the norms feeding attention, by family.
ATTN_NORM = {"gpt2": r"\.ln_1\.", "neox": r"\.input_layernorm\.", "llama": r"\.input_layernorm\.",
             "bert": r"\.attention\.output\.LayerNorm\."}


def model_of(kind: str):
    if kind == "gpt2":
        return tiny_gpt2()
    return tiny_bert() if kind == "bert" else tiny_model(kind)


def batch_of(kind: str) -> dict:
    if kind == "bert":
        return padded_batch()
    ids = torch.randint(1, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def steps(model, batch: dict, n: int = 3, mask=None) -> None:
    """n AdamW steps (lr 1e-2, weight decay 0.5, so a frozen tensor that got into the optimizer would move), each
    followed by `mask.restore` where a mask is given (as the training modules do)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for _ in range(n):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        if mask is not None:
            mask.restore(model)


def moved(before: dict, model) -> set[str]:
    after = model.state_dict()
    return {n for n, v in before.items() if not torch.equal(v, after[n])}


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama", "bert"])
def test_ln_attn_trains_exactly_the_attention_norms(kind):
    model = model_of(kind)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    model, mask = prepare(model, "ln-attn")
    steps(model, batch_of(kind), mask=mask)
    head = {n for n in before if n.startswith("classifier.")}
    expected = {n for n in before if re.search(ATTN_NORM[kind], n)} | head
    assert len(expected - head) == 2 * (1 if kind == "llama" else 2)  # 2 layers x gain (+ bias)
    assert moved(before, model) == expected
    assert trainable_parameters(model, mask) == sum(before[n].numel() for n in expected)


def lora_count(pairs: list[tuple[int, int]], r: int = 8, layers: int = 2) -> int:
    """Entries of rank-r LoRA on projections (in, out), per layer."""
    return layers * sum(r * (i + o) for i, o in pairs)


@pytest.mark.parametrize("method", ["lora", "lora-mlp", "prefix", "ln+lora", "ln+lora-mlp", "ln+prefix"])
def test_combinations_train_exactly_their_parameters(method):
    """GPT-2 (2 layers, d 32, 2 heads, 5 LayerNorms): LoRA A/B only in the intended projections, the prefix encoder,
    and for ln+ a trainable copy of every norm (PEFT modules_to_save); the base model's own tensors never move."""
    model, _ = prepare(tiny_gpt2(), method, head=None)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    steps(model, batch_of("gpt2"))
    changed = moved(before, model)
    side = {"lora": r"\.attn\.c_attn\.", "lora-mlp": r"\.mlp\.c_(fc|proj)\.", "prefix": r"^prompt_encoder\."}
    base = method.removeprefix("ln+")
    norms = {n for n in changed if "modules_to_save" in n}
    assert changed - norms and all(re.search(side[base], n) for n in changed - norms), sorted(changed)
    if base != "prefix":
        assert all(re.search(r"\.lora_[AB]\.", n) for n in changed - norms)
    assert len(norms) == (10 if method.startswith("ln+") else 0)  # 5 LayerNorms x (gain, bias)
    assert all(re.search(r"(ln_\d|ln_f)\.modules_to_save\.default\.(weight|bias)$", n) for n in norms)
    entries = {"lora": lora_count([(D, 3 * D)]), "lora-mlp": lora_count([(D, 4 * D), (4 * D, D)]),
               "prefix": 8 * 2 * 2 * D}[base] + (5 * 2 * D if method.startswith("ln+") else 0)
    assert trainable_parameters(model) == entries


def test_ln_lora_on_bert_trains_its_head_and_norms():
    model, _ = prepare(tiny_bert(), "ln+lora")
    before = {n: v.clone() for n, v in model.state_dict().items()}
    steps(model, padded_batch())
    changed = moved(before, model)
    assert {n for n in changed if "lora_" in n} and all(re.search(r"\.(query|value)\.lora_", n)
                                                        for n in changed if "lora_" in n)
    assert sum("LayerNorm.modules_to_save" in n for n in changed) == 5 * 2  # embeddings + 2 x 2 layers
    assert {n for n in changed if "classifier" in n} == {f"base_model.model.classifier.modules_to_save.default.{p}"
                                                         for p in ("weight", "bias")}


def test_prefix_on_an_encoder_and_unknown_methods_are_refused_by_name():
    for model, method, instead in ((tiny_bert(), "ln+prefix", "ln\\+lora"), (tiny_gpt2(), "prefix", "lora")):
        with pytest.raises(SurgeryError, match=f"PEFT builds prefix-tuning here only for a causal LM .* is not one, "
                                               f"so PEFT cannot build '{re.escape(method)}': use {instead} on it instead"):
            prepare(model, method, head="lm_head" if method == "prefix" else "auto")
    with pytest.raises(SurgeryError, match="norms must be one of all, attn, got 'mlp'"):
        ln_tune(tiny_gpt2(), LNTuneConfig(norms="mlp"))
    with pytest.raises(SurgeryError, match="bert layouts do not describe 'mlp_norm'; describe it in surgery/families.py"):
        block_part_paths(tiny_bert(), "mlp_norm")
    with pytest.raises(SurgeryError, match="unknown fine-tuning method 'ln-atn'; choose from full, head, .*ln-attn"):
        prepare(tiny_bert(), "ln-atn")
    with pytest.raises(SurgeryError, match="unknown method 'ln\\+bitfit' for a causal LM; choose from ln, ln-attn, full"):
        LNTuneLM("unused", method="ln+bitfit")
    with pytest.raises(SurgeryError, match="selection 'fisher' picks norm entries, but method 'lora' trains no norm "
                                           "subset: use selection all, or method ln / ln-attn"):
        LNTuneLM("unused", method="lora", selection="fisher")


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "ln_tune"


@pytest.mark.parametrize("recipe, method", [("minilm-ln-attn.yaml", "ln-attn"), ("minilm-ln-lora.yaml", "ln+lora"),
                                            ("tiny-gpt2-ln-attn.yaml", "ln-attn"),
                                            ("tiny-gpt2-ln-prefix.yaml", "ln+prefix")])
def test_method_recipes_show_their_method(recipe, method, capsys):
    from surgery.cli.lightning_cli import SurgeryCLI

    with pytest.raises(SystemExit) as exit_info:
        SurgeryCLI(args=["fit", "--config", str(RECIPES / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["method"] == method and "save_adapter" in config["model"]["init_args"]
    assert config["trainer"]["default_root_dir"] == f"runs/ln_tune/{recipe.removesuffix('.yaml')}"


def prefix_run(run_dir, model_dir, block_size: int) -> list[str]:
    return ["fit", "--config", str(RECIPES / "tiny-gpt2-ln-prefix.yaml"), "--trainer.default_root_dir", str(run_dir),
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--model.init_args.init", str(model_dir), "--model.init_args.warmup_steps", "1",
            "--data.init_args.tokenizer", str(model_dir), "--data.init_args.part", "json",
            "--data.init_args.block_size", str(block_size), "--data.init_args.batch_size", "2",
            "--trainer.enable_progress_bar", "false"]


@pytest.mark.slow
def test_prefix_recipe_runs_and_a_block_without_room_for_the_prefix_is_refused(tiny_lm_dir, tmp_path, capsys):
    """The tiny GPT-2 here has 64 positions: blocks of 56 + 8 prefix tokens fit, 60 + 8 do not."""
    from surgery.cli.entry import main

    assert main(prefix_run(tmp_path / "bad", tiny_lm_dir, 60)) != 0
    assert ("prefix-tuning adds 8 positions: blocks of 60 tokens would need 68, the model has 64; set "
            "data.init_args.block_size to 56 or less") in capsys.readouterr().err
    assert main(prefix_run(tmp_path / "run", tiny_lm_dir, 56)) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["ln_tune"]["method"] == "ln+prefix" and metrics["ln_tune"]["trainable"] == 8 * 2 * 2 * D + 5 * 2 * D
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_a_prefix_started_from_tokens_reads_like_those_tokens(kind):
    """transformers' own computation as the reference: after `init_prefix(ids)`, the prefix-tuned model on `rest`
    gives the base model's logits of `rest` read after `ids` (1e-5: the same attention, split across two calls)."""
    from surgery.ln_tune.combine import init_prefix

    base = model_of(kind)
    ids, rest = torch.arange(3, 11), torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=torch.cat([ids[None], rest], dim=1)).logits[:, 8:]
    model, _ = prepare(base, "prefix", head=None)
    init_prefix(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=rest).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(SurgeryError, match="pass as many ids as num_virtual_tokens"):
        init_prefix(model, ids[:5])
