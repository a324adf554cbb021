"""What a person sees on the terminal during `surgery fit`: a step count out of trainer.max_steps (also after a
resume mid-epoch), no library noise, and the results table on lines of its own. Two short runs of the tiny removal
recipe in subprocesses (~50 s), stdout and stderr merged into one stream as a terminal shows them."""

from __future__ import annotations

import pytest
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from reliability_setup import fit_args, write_setup

NOISE = ["loss_type=None", "LeafSpec", "litlogger", "💡 Tip", "`weights_only` was not set"]


def fit_merged(args: list[str], cache: Path) -> tuple[int, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURGERY_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "surgery.cli", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=300)
    return run.returncode, re.split(r"[\r\n]+", run.stdout)


def counts(lines: list[str]) -> list[tuple[int, int]]:
    return [tuple(map(int, m.groups())) for line in lines if ", steps:" in line and (m := re.search(r"\| (\d+)/(\d+) ", line))]


@pytest.mark.slow
def test_progress_counts_steps_and_the_table_starts_its_own_line(tmp_path):
    recipe = write_setup(tmp_path, dropout=0.0)
    with_bar = [*fit_args(recipe, tmp_path / "run"), "--trainer.enable_progress_bar", "true"]  # the bar on
    code, killed = fit_merged([*with_bar, "--trainer.callbacks+=reliability_setup.KillAt",
                               "--trainer.callbacks.init_args.step", "12"], tmp_path / "cache")
    assert code != 0
    assert any(line.startswith("epoch 0, steps:") for line in killed) and not any("/-2" in line for line in killed)
    assert counts(killed) and all(total == 16 for _, total in counts(killed))
    code, resumed = fit_merged(with_bar, tmp_path / "cache")  # resumes step 12, mid-way through epoch 1
    assert code == 0, resumed[-20:]
    steps = counts(resumed)
    assert steps[0] == (12, 16) and steps[-1] == (16, 16) and all(n <= total == 16 for n, total in steps), steps
    title = [line for line in resumed if "LayerNorm removal: results" in line]
    assert title and title[0].strip().startswith("LayerNorm removal"), title  # not glued to the bar's last line
    for noise in NOISE:
        assert not any(noise in line for line in killed + resumed), noise


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_evaluation_shows_progress_on_a_terminal_only(monkeypatch):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from surgery.eval.loss import cross_entropy

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0))
    blocks = [torch.randint(0, 50, (8,)) for _ in range(42)]
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert cross_entropy(model, blocks, batch_size=2)["tokens"] == 42 * 7
        assert ("evaluating: 100%" in stream.getvalue() and "21/21" in stream.getvalue()) == shown
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cross_entropy(model, blocks[:10], batch_size=2)  # 5 batches: over at once, no bar
    assert terminal.getvalue() == ""
