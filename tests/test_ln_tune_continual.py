"""Task-keyed norm sets: selection, what training touches, save/reload, the second forward, and the user errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from surgery.errors import SurgeryError
from surgery.ln_tune.continual.keyed import KeyedNorms
from surgery.ln_tune.continual.report import forgetting
from surgery.ln_tune.continual.sequence import ContinualConfig
from surgery.ln_tune.continual.stages import key_loss, norm_set_loss, train_stage
from surgery.ln_tune.continual.tasks import LMTasks
from tiny_models import tiny_gpt2

TASKS = ("a", "b", "c")


def keyed_model(seed: int = 0) -> KeyedNorms:
    """A tiny GPT-2 with three norm sets, each moved off the model's own norms by its own random offsets."""
    keyed = KeyedNorms(tiny_gpt2(seed))
    for i, task in enumerate(TASKS):
        keyed.add_task(task, seed=i)
        with torch.no_grad():
            for p in keyed.sets.values[task]:
                p.add_(0.3 * torch.randn_like(p))
    return keyed.eval()


def with_set(keyed: KeyedNorms, task: str) -> GPT2LMHeadModel:
    """A copy of the model with set `task` written into its own norms (the reference for the second forward)."""
    model = copy.deepcopy(keyed.model)
    model.load_state_dict({n: v.detach() for n, v in keyed.sets.set_values(task).items()}, strict=False)
    return model


def token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per row (B,)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def test_selection_picks_the_planted_key_and_a_wrong_key_costs_the_wrong_sets_loss():
    keyed = keyed_model()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    q = keyed.query(ids)
    with torch.no_grad():  # each input's own query is its task's key: cosine 1 with it, < 1 with the others
        for i, task in enumerate(TASKS):
            keyed.sets.keys[task].copy_(q[i])
    assert keyed.select(ids).tolist() == [0, 1, 2]
    right = token_loss(keyed(ids), ids)
    for i, task in enumerate(TASKS):
        torch.testing.assert_close(right[i], token_loss(with_set(keyed, task)(ids[i : i + 1]).logits, ids[i : i + 1])[0])
    with torch.no_grad():  # plant wrong keys: a's and c's keys swapped, so inputs 0 and 2 select each other's set
        keyed.sets.keys["a"].copy_(q[2])
        keyed.sets.keys["c"].copy_(q[0])
    assert keyed.select(ids).tolist() == [2, 1, 0]
    wrong = token_loss(keyed(ids), ids)
    for row, planted in ((0, "c"), (2, "a")):
        expected = token_loss(with_set(keyed, planted)(ids[row : row + 1]).logits, ids[row : row + 1])[0] - right[row]
        torch.testing.assert_close(wrong[row] - right[row], expected)
        assert abs(float(expected.detach())) > 1e-3  # the sets differ, so a wrong key costs something
    assert wrong[1] == right[1]  # the row whose key is right is untouched


def test_training_a_task_changes_only_its_set_and_key():
    keyed = keyed_model(seed=2)
    before = copy.deepcopy(keyed.state_dict())
    blocks = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(3))
    tasks = LMTasks()
    queries = torch.cat([keyed.query(blocks)])
    train_stage(keyed, key_loss(keyed, "b"), [([keyed.sets.keys["b"]], 0.05)], DataLoader(queries, batch_size=4), 3)
    train_stage(keyed, norm_set_loss(keyed, tasks, "b"), [(list(keyed.sets.values["b"]), 0.05)],
                DataLoader(blocks, batch_size=4), 3)
    after = keyed.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    b_entries = {n for n in before if n.startswith("sets.values.b.")} | {"sets.keys.b"}
    assert changed == b_entries  # every entry of b's set and key moved; nothing else, bit for bit


def test_saved_sets_reload_and_select_the_same_sets(tmp_path):
    keyed = keyed_model(seed=4)
    ids = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(5))
    keyed.save(tmp_path / "m")
    again = KeyedNorms.load(tmp_path / "m", GPT2LMHeadModel).eval()
    assert again.sets.names == list(TASKS)
    assert torch.equal(again.select(ids), keyed.select(ids))
    assert len(set(keyed.select(ids).tolist())) > 1  # random keys: the inputs spread over sets
    torch.testing.assert_close(again(ids), keyed(ids), rtol=0, atol=0)


@pytest.mark.slow  # importing PEFT: ~10 s
def test_the_second_forward_matches_pefts_ln_tuning_adapter_holding_the_set():
    from peft import LNTuningConfig, get_peft_model

    from surgery.ln_tune.params import norm_modules

    keyed = keyed_model(seed=6)
    ids = torch.randint(0, 64, (5, 10), generator=torch.Generator().manual_seed(7))
    config = LNTuningConfig(target_modules=list(norm_modules(keyed.model)))
    peft = get_peft_model(copy.deepcopy(keyed.model), config, adapter_name=TASKS[0])
    for task in TASKS[1:]:
        peft.add_adapter(task, config)
    params = dict(peft.named_parameters())
    with torch.no_grad():
        for task in TASKS:
            for name, value in keyed.sets.set_values(task).items():
                module, leaf = name.rsplit(".", 1)
                params[f"base_model.model.{module}.ln_tuning_layers.{task}.{leaf}"].copy_(value)
    chosen = keyed.select(ids)
    ours = keyed(ids)
    peft.eval()
    for row, t in enumerate(chosen.tolist()):
        peft.set_adapter(TASKS[t])
        torch.testing.assert_close(ours[row : row + 1], peft(input_ids=ids[row : row + 1]).logits, rtol=1e-5, atol=1e-5)


def test_forgetting_is_the_drop_from_the_best_earlier_score():
    g = torch.Generator().manual_seed(8)
    m = (0.5 + 0.5 * torch.rand(4, 4, generator=g)).tolist()
    for j in range(3):  # the last row at each earlier task's best: nothing forgotten
        m[3][j] = max(m[i][j] for i in range(j, 3))
    assert forgetting(m, higher_is_better=True) == pytest.approx(0.0)
    m[3][1] -= 0.12
    assert forgetting(m, higher_is_better=True) == pytest.approx(0.04)
    losses = [[-v for v in row] for row in m]
    assert forgetting(losses, higher_is_better=False) == pytest.approx(0.04)


def test_a_task_name_that_does_not_exist_names_the_sets():
    keyed = keyed_model()
    with pytest.raises(SurgeryError, match=r"no norm set named 'd'; the sets are \['a', 'b', 'c'\]: use one of them"):
        keyed(torch.zeros(1, 4, dtype=torch.long), task="d")


def test_selecting_sets_on_a_model_without_them_says_to_train_or_load():
    keyed = KeyedNorms(tiny_gpt2())
    with pytest.raises(SurgeryError, match="no norm sets to select from: train at least one task first"):
        keyed.select(torch.zeros(1, 4, dtype=torch.long))


def test_loading_a_plain_model_as_keyed_says_it_has_no_sets(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(SurgeryError, match="holds no norm_sets.safetensors: it is not a model saved with norm sets"):
        KeyedNorms.load(tmp_path, GPT2LMHeadModel)


@pytest.mark.parametrize("tasks, message", [
    (["email"], r"needs at least two tasks, got \['email'\]: list two or more under tasks"),
    (["email", "email"], "names a task twice: list each task once"),
    (["email", "no_such_package"], r"unknown language-modelling task\(s\) \['no_such_package'\]: a task is a package"),
])
def test_a_bad_sequence_names_the_fix(tasks, message):
    with pytest.raises(SurgeryError, match=message):
        ContinualConfig("lm", tasks).check()


def test_an_unknown_sentiment_source_names_the_sources():
    with pytest.raises(SurgeryError, match=r"unknown sentiment task\(s\) \['reddit'\]: a task is one VADER source"):
        ContinualConfig("sentiment", ["movies", "reddit"]).check()


def test_the_command_refuses_a_one_task_recipe_in_one_line(tmp_path, capsys):
    from surgery.cli.entry import main

    recipe = tmp_path / "one.yaml"
    recipe.write_text("setting: lm\ntasks: [email]\n")
    assert main(["continual", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surgery continual: error: a continual sequence needs at least two tasks")
    assert len(err.splitlines()) == 1


@pytest.mark.slow  # two tasks, every method, a few steps each on the tiny GPT-2: about a minute on one core
def test_the_command_runs_a_sequence_writes_its_measures_and_resumes(tmp_path, capsys):
    import json

    from surgery.cli.entry import main

    recipe = tmp_path / "two.yaml"
    recipe.write_text("setting: lm\ntasks: [json, email]\ndata: {model: checkpoints/tiny-gpt2-stdlib, block_size: 32, "
                      "batch_size: 4, max_test_blocks: 4}\nsteps: 2\nkey_steps: 5\n")
    out = tmp_path / "run"
    assert main(["continual", "--config", str(recipe), "--out", str(out), "--order", "email,json"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["tasks"] == ["email", "json"]
    assert set(metrics["arms"]) == {"keyed", "oracle", "full", "ln-shared", "joint"}
    assert len(metrics["matrices"]["keyed"]) == 2 and len(metrics["matrices"]["joint"]) == 1
    assert metrics["arms"]["keyed"]["entries_per_task"] == 4 * 2 * 2 * 128 + 2 * 128 + 128  # 9 norms' gain+bias, key
    assert (out / "cl_matrix.png").stat().st_size > 0
    again = KeyedNorms.load(out / "keyed_model", GPT2LMHeadModel)
    assert again.sets.names == ["email", "json"]
    stamp = (out / "keyed.json").stat().st_mtime
    assert main(["continual", "--config", str(recipe), "--out", str(out), "--order", "email,json"]) == 0
    assert (out / "keyed.json").stat().st_mtime == stamp  # finished methods are not rerun
    assert "key selection" in capsys.readouterr().out
