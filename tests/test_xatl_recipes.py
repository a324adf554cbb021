"""Every XATL recipe parses and shows its full configuration (`--print_config`)."""

from pathlib import Path

import pytest
import yaml

from surgery.cli.lightning_cli import SurgeryCLI

RECIPES = sorted((Path(__file__).parent.parent / "recipes" / "xatl").glob("*.yaml"))


QUICKSTART_SOURCES = {"": "checkpoints/tiny-gpt2-stdlib", "pythia-": "checkpoints/tiny-pythia-stdlib",
                      "llama-": "checkpoints/tiny-llama-stdlib"}


def test_the_recipes_exist():
    names = {p.name for p in RECIPES}
    for mixer in ("mamba", "retention", "gla"):
        assert f"quickstart-{mixer}.yaml" in names and f"gpt2-{mixer}.yaml" in names
        assert f"quickstart-{mixer}-scratch.yaml" in names
    for family in ("pythia", "llama"):
        assert {f"quickstart-{family}-mamba.yaml", f"quickstart-{family}-gla.yaml"} <= names
    assert {"pythia-410m-retention.yaml", "pythia-410m-mamba.yaml", "smollm2-135m-gla.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_print_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SurgeryCLI(args=["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]
    assert model["class_path"] == "surgery.xatl.training.module.XatlLM"
    args = model["init_args"]
    assert args["mixer"] in recipe.name and args["unfreeze"]["warmup_steps"] > 0  # defaults shown in full
    assert args["freeze"] == bool(args["transfer"])
    if recipe.name.startswith("quickstart"):
        family = next(f for f in ("pythia-", "llama-", "") if recipe.name.startswith(f"quickstart-{f}"))
        assert args["source"] == QUICKSTART_SOURCES[family] and config["trainer"]["accelerator"] == "cpu"
        assert config["data"]["init_args"]["tokenizer"] == args["source"]


@pytest.mark.parametrize("family", ["pythia", "llama"])
@pytest.mark.parametrize("mixer", ["mamba", "gla"])
def test_family_quickstarts_mirror_the_gpt2_quickstart(family, mixer):
    """Same token budget, stages, schedule, mixer and transfer as the GPT-2 quick start: only the source (and
    its tokenizer) and the run directory differ."""
    here = Path(__file__).parent.parent / "recipes" / "xatl"
    gpt2, other = (yaml.safe_load((here / f"quickstart-{f}{mixer}.yaml").read_text()) for f in ("", f"{family}-"))
    assert other["trainer"]["default_root_dir"] == f"runs/xatl/quickstart-{family}-{mixer}"
    for cfg in (gpt2, other):
        del cfg["model"]["init_args"]["source"], cfg["data"]["init_args"]["tokenizer"], cfg["trainer"]["default_root_dir"]
    assert gpt2 == other


@pytest.mark.parametrize("mixer", ["mamba", "retention", "gla"])
def test_scratch_control_differs_only_in_what_is_transferred(mixer):
    """Same architecture, data, steps and learning rate as the XATL recipe: only transfer, freeze, the run
    directory and the stages that use the source as a teacher (align, distill, lm_after) differ."""
    here = Path(__file__).parent.parent / "recipes" / "xatl"
    xatl, scratch = (yaml.safe_load((here / f"quickstart-{mixer}{s}.yaml").read_text()) for s in ("", "-scratch"))
    assert scratch["model"]["init_args"]["transfer"] == [] and scratch["model"]["init_args"]["freeze"] is False
    teacher_stages = ("align", "distill", "lm_after")
    assert not any(k in scratch["model"]["init_args"] for k in teacher_stages)
    for key in teacher_stages:
        xatl["model"]["init_args"].pop(key, None)
    for cfg in (xatl, scratch):
        for key in ("transfer", "freeze"):
            del cfg["model"]["init_args"][key]
        del cfg["trainer"]["default_root_dir"]
    assert xatl == scratch


def test_hybrid_quickstart_is_the_gla_quickstart_with_a_window_one_attention_layer_and_no_unfreezing():
    here = Path(__file__).parent.parent / "recipes" / "xatl"
    gla, hybrid = (yaml.safe_load((here / f"quickstart-gla{s}.yaml").read_text()) for s in ("", "-hybrid"))
    h = hybrid["model"]["init_args"]
    assert h.pop("mixer_config").pop("window") == 32 and h.pop("attn_layers") == "auto"
    assert h.pop("auto_attn") == {"keep": 1, "criterion": "kl"} and "attn_layers" in h["transfer"]
    assert h.pop("unfreeze") == {"step": None, "threshold": None} and h["freeze"] is True
    gla["model"]["init_args"].pop("mixer_config").pop("window", None)
    assert gla["model"]["init_args"].pop("attn_layers") == []
    assert gla["model"]["init_args"].pop("unfreeze")["step"] == 100
    for cfg in (gla, hybrid):
        del cfg["trainer"]["default_root_dir"]
    assert gla == hybrid


def test_the_1200_step_mamba_quickstart_spends_the_same_tokens_in_smaller_steps():
    here = Path(__file__).parent.parent / "recipes" / "xatl"
    base, small = (yaml.safe_load((here / f"quickstart-mamba{s}.yaml").read_text()) for s in ("", "-1200steps"))
    tokens = [c["trainer"]["max_steps"] * c["data"]["init_args"]["batch_size"] * c["data"]["init_args"]["block_size"]
              for c in (base, small)]
    assert tokens == [307_200, 307_200]
    b, m = base["model"]["init_args"], small["model"]["init_args"]
    assert m["align"]["steps"] == m["unfreeze"]["step"] == small["trainer"]["max_steps"] // 3  # as in the base
    assert b["align"]["steps"] == b["unfreeze"]["step"] == base["trainer"]["max_steps"] // 3
    assert (m["mixer_config"].pop("d_state"), b["mixer_config"].pop("d_state")) == (16, 8)
    assert (m["unfreeze"].pop("lr_ratio"), b["unfreeze"].pop("lr_ratio")) == (0.1, 1.0)
    assert (m.pop("lr"), b.pop("lr")) == (4e-3, 2e-3)
    assert m["mixer_config"].pop("conv_init") == "identity" and "conv_init" not in b["mixer_config"]
    for cfg in (base, small):
        for path in ("trainer.default_root_dir", "trainer.max_steps", "trainer.val_check_interval",
                     "data.init_args.batch_size", "checkpoint.every_n_train_steps", "model.init_args.warmup_steps",
                     "model.init_args.align.steps", "model.init_args.unfreeze.step",
                     "model.init_args.unfreeze.warmup_steps"):
            *parents, leaf = path.split(".")
            node = cfg
            for key in parents:
                node = node[key]
            del node[leaf]
    assert base == small


@pytest.mark.parametrize("family", ["pythia", "llama"])
@pytest.mark.parametrize("arm", ["", "-hybrid"])
def test_family_mamba2_quickstarts_mirror_the_gpt2_ones(family, arm):
    """Only the source, its tokenizer, the run directory, the rotated windows and (Llama) the K/V groups differ;
    all at 256 tokens, the same 307k tokens as the 128-token quick starts."""
    here = Path(__file__).parent.parent / "recipes" / "xatl"
    gpt2, other = (yaml.safe_load((here / f"quickstart-{f}mamba2{arm}.yaml").read_text()) for f in ("", f"{family}-"))
    assert other["trainer"]["default_root_dir"] == f"runs/xatl/quickstart-{family}-mamba2{arm}"
    assert other["model"]["init_args"]["mixer_config"].pop("n_kv_head", None) == (2 if family == "llama" else None)
    assert other["model"]["init_args"]["mixer_config"].pop("window_rotary") is True  # rotary sources
    for cfg in (gpt2, other):
        del cfg["model"]["init_args"]["source"], cfg["data"]["init_args"]["tokenizer"], cfg["trainer"]["default_root_dir"]
    assert gpt2 == other
    data = gpt2["data"]["init_args"]
    assert data["block_size"] == 256 and gpt2["trainer"]["max_steps"] * data["batch_size"] * data["block_size"] == 307_200
