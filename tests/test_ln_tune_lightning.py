"""The LN-tuning recipes run through `surgery fit`: masks saved with the run, only masked LN entries move,
the exported model is a plain `transformers` model, and a saved mask is reused by a later run."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from surgery.cli.entry import main
from surgery.data.tokenizer import get_tokenizer
from surgery.errors import SurgeryError
from surgery.ln_tune import EntryMask, ln_parameters
from surgery.ln_tune.lm import LNTuneLM, StdlibPartCorpus
from ln_tune_models import tiny_gpt2
from remove_ln_models import tiny_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "ln_tune"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random GPT-2 with a 300-entry BPE trained on the stdlib's `json` package, saved as a model directory."""
    path = tmp_path_factory.mktemp("tiny_lm")
    tok = get_tokenizer("bpe-300", StdlibPartCorpus("stdlib:json", part="json"))
    model = tiny_gpt2(vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fit_lm(run_dir, model_dir, *extra, recipe="tiny-gpt2-email.yaml"):
    args = ["fit", "--config", str(RECIPES / recipe), "--trainer.default_root_dir", str(run_dir),
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
            "--model.init_args.init", str(model_dir), "--model.init_args.warmup_steps", "1",
            "--model.init_args.lr", "0.05", "--model.init_args.weight_decay", "0.5", "--model.init_args.fisher_samples", "8",
            "--data.init_args.tokenizer", str(model_dir), "--data.init_args.part", "json",
            "--data.init_args.block_size", "32", "--data.init_args.batch_size", "4", *QUIET, *extra]
    assert main(args) == 0
    return AutoModelForCausalLM.from_pretrained(run_dir / "model")


def test_causal_lm_fisher_recipe_moves_only_masked_entries(tiny_lm_dir, tmp_path):
    init = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tuned = fit_lm(tmp_path / "run", tiny_lm_dir, "--model.init_args.selection", "fisher")
    mask = EntryMask.load(tmp_path / "run" / "masks.safetensors")
    assert mask.total() == 320 and mask.selected() == 32 and mask.metadata["selection"] == "fisher-top-k"
    before, after = dict(init.named_parameters()), dict(tuned.named_parameters())
    for n in before:
        if n in mask.masks:
            m = mask.masks[n]
            assert torch.equal(after[n][~m], before[n][~m]), n  # weight decay 0.5 did not move them
            assert (after[n][m] != before[n][m]).all(), n
        else:
            assert torch.equal(after[n], before[n]), n
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["ln_tune"]["trainable"] == 32 and metrics["ln_tune"]["ln_entries"] == 320
    assert metrics["ln_tune"]["val_before"]["loss"] > 0 and metrics["steps"] == 4


@pytest.mark.parametrize("family, kind, cls, per_norm", [("pythia", "neox", "GPTNeoXForCausalLM", 2 * 32),
                                                         ("llama", "llama", "LlamaForCausalLM", 32)])
def test_family_recipes_tune_only_masked_norm_entries(family, kind, cls, per_norm, tiny_lm_dir, tmp_path):
    """tiny-{pythia,llama}-email.yaml on a tiny random model of that family (the json BPE): a Fisher mask over
    5 norms' gains and biases (RMSNorm: gains only), nothing else moves, the export is the family's own class."""
    model_dir = tmp_path / kind
    tok = get_tokenizer(str(tiny_lm_dir))
    tiny_model(kind, vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    init = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = fit_lm(tmp_path / "run", model_dir, "--model.init_args.selection", "fisher", recipe=f"tiny-{family}-email.yaml")
    assert type(tuned).__name__ == cls
    mask = EntryMask.load(tmp_path / "run" / "masks.safetensors")
    assert mask.total() == 5 * per_norm and mask.selected() == round(0.1 * 5 * per_norm)
    before, after = dict(init.named_parameters()), dict(tuned.named_parameters())
    for n in before:
        m = mask.masks.get(n, torch.zeros(before[n].shape, dtype=torch.bool))
        assert torch.equal(after[n][~m], before[n][~m]), n
        assert (after[n][m] != before[n][m]).all(), n
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["ln_tune"]
    assert metrics["norms"] == (["LlamaRMSNorm"] if kind == "llama" else ["LayerNorm"])
    assert metrics["trainable"] == mask.selected()


def test_a_saved_mask_is_reused_and_reproduces_the_run(tiny_lm_dir, tmp_path):
    first = fit_lm(tmp_path / "a", tiny_lm_dir, "--model.init_args.selection", "random", "--model.init_args.seed", "3")
    mask_file = tmp_path / "a" / "masks.safetensors"
    second = fit_lm(tmp_path / "b", tiny_lm_dir, "--model.init_args.selection", "mask",
                    "--model.init_args.mask", str(mask_file))
    reloaded = EntryMask.load(tmp_path / "b" / "masks.safetensors")
    assert reloaded.metadata["selection"] == "random" and reloaded.selected() == 32
    for (n, p), q in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("family", ["gpt2", "pythia", "llama"])
def test_lm_recipes_print_their_full_config(family, capsys):
    from surgery.cli.lightning_cli import SurgeryCLI

    with pytest.raises(SystemExit) as exit_info:
        SurgeryCLI(args=["fit", "--config", str(RECIPES / f"tiny-{family}-email.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["init"] == data["tokenizer"] == f"checkpoints/tiny-{family}-stdlib"  # the model's own tokenizer
    assert model["betas"] == [0.9, 0.999] and data["part"] == "email"  # defaults shown in full
    assert config["trainer"]["default_root_dir"] == f"runs/ln_tune/tiny-{family}-email"


def test_lm_selection_errors(tiny_lm_dir):
    with pytest.raises(SurgeryError, match="selection must be all, fisher, random or mask, got 'top'"):
        LNTuneLM(init=str(tiny_lm_dir), selection="top")
    with pytest.raises(SurgeryError, match="selection 'mask' needs model.init_args.mask"):
        LNTuneLM(init=str(tiny_lm_dir), selection="mask")


def test_sentiment_recipe_with_fisher_mask(tmp_path):
    """The classification recipe on a tiny random BERT (MiniLM's vocabulary) and 64 real sentences."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    init = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=2)
    run = tmp_path / "run"
    args = ["fit", "--config", str(RECIPES / "minilm-sentiment.yaml"), "--trainer.default_root_dir", str(run),
            "--model.init_args.init", str(tmp_path / "bert"), "--model.init_args.method", "ln-fisher",
            "--model.init_args.fisher_samples", "16", "--model.init_args.weight_decay", "0.5",
            "--data.init_args.max_train", "64", "--data.init_args.max_test", "32", "--data.init_args.sources", "[tweets]",
            "--data.init_args.batch_size", "16", *QUIET]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "ln-fisher" and metrics["steps"] == 4
    assert metrics["trainable"] == 32 + 32 * 2 + 2  # 10% of 5 x 2 x 32 LN entries, plus the head
    assert 0 <= metrics["test_accuracy"] <= 1
    assert set(load_file(run / "fisher.safetensors")) == set(ln_parameters(init))
    mask = EntryMask.load(run / "masks.safetensors")
    tuned = AutoModelForSequenceClassification.from_pretrained(run / "model")
    before, after = dict(init.named_parameters()), dict(tuned.named_parameters())
    for n, m in mask.masks.items():
        assert torch.equal(after[n][~m], before[n][~m]), n
    frozen = [n for n in before if n not in mask.masks and not n.startswith("classifier")]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
