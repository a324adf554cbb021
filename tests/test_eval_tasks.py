"""`surgery eval --tasks` through lm-evaluation-harness, offline: the `stdlib_next_line` task (surgery.eval.tasks)
on a shipped checkpoint and on a saved hybrid, with lm-eval's accuracy recomputed here from the model's own
log-likelihoods; the task builder; the command's errors."""

import json
import math
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from surgery.cli.entry import main
from surgery.eval.tasks import TASK, next_line_docs, stdlib_next_line
from surgery.models.loading import load_causal_lm, load_tokenizer
from surgery.models.shipped import resolve_shipped

GPT2 = resolve_shipped("checkpoints/tiny-gpt2-stdlib")
LLAMA = resolve_shipped("checkpoints/tiny-llama-stdlib")
N_DOCS = 32


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return stdlib_next_line(tmp_path_factory.mktemp("tasks"), n_docs=N_DOCS).parent


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def choice_logliks(model, tokenizer, context: str, choices: list[str], delimiter: str) -> list[float]:
    """Sum of log-probabilities (nats) of each choice's tokens given the context, tokenized as lm-eval's HFLM does:
    trailing whitespace of the context moves to the continuation, context+continuation is encoded whole and the
    continuation is what follows the context's own encoding."""
    out = []
    for choice in choices:
        ctx, cont = context, delimiter + choice
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        ctx_ids = tokenizer(ctx)["input_ids"]
        cont_ids = tokenizer(ctx + cont)["input_ids"][len(ctx_ids):]
        ids = torch.tensor([ctx_ids + cont_ids])
        positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
        assert ids.shape[1] <= positions  # lm-eval truncates nothing here, so neither do we
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).logits[0].double(), -1)
        out.append(sum(logp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids)))
    return out


def our_accuracy(model_dir: str, task_dir: Path, limit: int | None = None) -> dict:
    """acc and acc_norm (argmax of log-likelihood per character of the choice) with lm-eval's standard error."""
    model, tokenizer = load_causal_lm(model_dir).eval(), load_tokenizer(model_dir)
    config = yaml.safe_load((task_dir / f"{TASK}.yaml").read_text())
    delimiter = config.get("target_delimiter", " ")
    docs = [json.loads(line) for line in (task_dir / f"{TASK}.jsonl").read_text().splitlines()][:limit]
    acc, acc_norm, margin = [], [], math.inf
    for doc in docs:
        lls = np.array(choice_logliks(model, tokenizer, doc[config["doc_to_text"]], doc[config["doc_to_choice"]], delimiter))
        per_char = lls / np.array([len(c) for c in doc["choices"]])
        gold = doc[config["doc_to_target"]]
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(per_char) == gold))
        margin = min(margin, *(np.diff(np.sort(x))[-1] for x in (lls, per_char)))

    def stat(x):
        m = sum(x) / len(x)
        return {"value": m, "stderr": math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1)) / math.sqrt(len(x))}

    return {"acc": stat(acc), "acc_norm": stat(acc_norm), "n": len(docs), "margin": margin}


def check_same(reported: dict, ours: dict) -> None:
    lm_eval = reported["lm_eval"]
    assert lm_eval["n_samples"][TASK] == ours["n"]
    # lm-eval's log-likelihoods (float32, batched) differ from ours by ~2e-5 nats; every doc's best choice leads the
    # next (per doc, per char) by more, so the argmax, and so the accuracy, must be the same
    assert ours["margin"] > 1e-4
    for metric in ("acc", "acc_norm"):
        got = lm_eval["tasks"][TASK][metric]
        assert got["value"] == ours[metric]["value"], metric  # the same docs right: exactly equal
        assert got["stderr"] == pytest.approx(ours[metric]["stderr"], rel=1e-9), metric


@pytest.mark.slow
def test_lm_eval_accuracy_equals_ours_from_the_models_log_likelihoods(task_dir, tmp_path, capsys):
    code, out, err = _eval(capsys, GPT2, "--tasks", TASK, "--include-path", str(task_dir), "--json", str(tmp_path / "r.json"))
    assert code == 0, err[-2000:]
    reported = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(out.strip().splitlines()[-1]) == reported
    assert "loss" not in reported  # --tasks alone: no cross-entropy unless --data asks for it
    check_same(reported, our_accuracy(GPT2, task_dir))
    assert "stdlib_next_line" in out and "acc_norm" in out and "± stderr" in out  # the table


@pytest.mark.slow
def test_a_saved_hybrid_through_the_auto_classes_and_the_task_built_on_demand(tmp_path, monkeypatch, capsys):
    """A Llama hybrid (GLA in layer 0, attention kept in layer 1) saved like an export; `stdlib_next_line` without
    --include-path is written under the surgery cache; --limit takes the first docs; --data adds the cross-entropy."""
    from surgery.xatl import hybrid_config_from, hybrid_model
    from surgery.xatl.transfer.weights import transfer_shared_weights

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    source = load_causal_lm(LLAMA)
    torch.manual_seed(0)
    hybrid = hybrid_model(hybrid_config_from(source.config, "gla", {}, [1]))
    transfer_shared_weights(source, hybrid)
    hybrid.save_pretrained(tmp_path / "hybrid")
    load_tokenizer(LLAMA).save_pretrained(tmp_path / "hybrid")
    text = tmp_path / "held_out.txt"  # --data: cross-entropy on the last 2% of it
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    code, out, err = _eval(capsys, str(tmp_path / "hybrid"), "--tasks", TASK, "--limit", "24", "--data", str(text),
                           "--block-size", "32", "--json", str(tmp_path / "r.json"))
    assert code == 0, err[-2000:]
    reported = json.loads((tmp_path / "r.json").read_text())
    assert reported["loss"] > 0 and reported["lm_eval"]["limit"] == 24
    check_same(reported, our_accuracy(str(tmp_path / "hybrid"), tmp_path / "cache" / "lm_eval_tasks", limit=24))


def test_next_line_docs_hold_the_real_line_among_lines_of_other_files():
    texts = ["".join(f"file{f}_line_{i:03d} = {i}\n" for i in range(40)) for f in range(3)]
    docs = next_line_docs(texts, 10, context_lines=3, seed=1)
    assert docs == next_line_docs(texts, 10, context_lines=3, seed=1)  # seeded
    assert docs != next_line_docs(texts, 10, context_lines=3, seed=2)
    for d in docs:
        lines = texts[d["file"]].splitlines()
        assert d["choices"][d["gold"]] == lines[d["line"] - 1]
        assert d["context"] == "".join(line + "\n" for line in lines[max(0, d["line"] - 4):d["line"] - 1])
        others = [c for i, c in enumerate(d["choices"]) if i != d["gold"]]
        assert len(set(d["choices"])) == 4 and all(not c.startswith(f"file{d['file']}_") for c in others)


def test_next_line_docs_refuse_a_corpus_too_small():
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="10 docs need at least 2 files with 10 usable lines; found 1 files"):
        next_line_docs(["some_line = 1\n" * 40], 10)


@pytest.mark.parametrize("args, message", [
    (["--tasks", " , "], "--tasks ' , ': name at least one task, e.g. --tasks stdlib_next_line"),
    (["--tasks", TASK, "--limit", "0"], "--limit 0: evaluate at least one doc per task, or omit --limit for all of them"),
    (["--tasks", TASK, "--num-fewshot", "-1"], "--num-fewshot -1: pass 0 or more examples per prompt"),
    (["--include-path", "."], "--include-path names folders of lm-eval tasks: pass --tasks with the tasks to run from them"),
    (["--tasks", TASK, "--include-path", "no/such/dir"], "--include-path no/such/dir: no such folder; pass a folder of "
     "lm-eval task YAMLs"),
    (["--tasks", TASK, "--include-path", "pyproject.toml"], "--include-path pyproject.toml: not a folder; pass the folder "
     "that holds the task YAML, not the file"),
])
def test_eval_refuses_task_arguments_it_cannot_use(args, message, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    code, _, err = _eval(capsys, GPT2, *args)
    assert code == 2 and f"surgery eval: error: {message}" in err, err[-1500:]


def test_without_lm_eval_installed_tasks_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    code, _, err = _eval(capsys, GPT2, "--tasks", TASK)
    assert code == 2 and "surgery eval: error: --tasks runs lm-evaluation-harness, which is not installed (" in err
    assert "pip install 'lm-surgery[eval]' (or 'lm-eval[hf]')" in err


def test_a_task_whose_data_file_is_gone_is_one_line(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "task": "gone", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "gone.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
        "doc_to_target": "gold"}))
    code, _, err = _eval(capsys, GPT2, "--tasks", "gone", "--include-path", str(tmp_path))
    assert code == 2 and "surgery eval: error: --tasks gone: could not load a task's dataset (" in err, err[-1500:]
    assert "offline, use a local task such as stdlib_next_line" in err


@pytest.mark.slow
def test_an_unknown_task_names_the_close_ones(task_dir, capsys):
    """Reads lm-eval's index of built-in tasks (tens of seconds) to be sure the name is nowhere."""
    code, _, err = _eval(capsys, GPT2, "--tasks", "stdlib_next_lines,hellaswagg", "--include-path", str(task_dir))
    assert code == 2, err[-1500:]
    assert "surgery eval: error: --tasks: lm-eval knows no task 'stdlib_next_lines', 'hellaswagg' " in err
    assert "'stdlib_next_lines': did you mean stdlib_next_line" in err and "'hellaswagg': did you mean hellaswag" in err


@pytest.mark.slow
def test_importing_lm_eval_brings_no_gpu_kernels():
    """transformers switches to mamba-ssm / causal-conv1d / fla kernels whenever they are imported, even on CPU (and
    then fails): lm-eval and its HF wrapper must not import them, nor triton."""
    import subprocess

    code = ("import sys, surgery, lm_eval, lm_eval.models.huggingface, lm_eval.tasks; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'fla', 'mamba_ssm', 'causal_conv1d')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_typo_of_our_offline_task_is_named_before_the_builtin_index_is_read(capsys, monkeypatch):
    """`stdlib_nextline` is answered with `stdlib_next_line` at once: lm-eval's built-in index (tens of seconds) is
    never scanned, which the stand-in below would refuse."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    def local_only(*args, include_defaults=True, **kwargs):
        assert include_defaults is False, "the built-in task index was read"
        return real(*args, include_defaults=include_defaults, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_only)
    code, _, err = _eval(capsys, GPT2, "--tasks", "stdlib_nextline")
    assert code == 2
    assert "--tasks: lm-eval knows no task 'stdlib_nextline' ('stdlib_nextline': did you mean stdlib_next_line?)" in err
