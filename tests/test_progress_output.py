"""What a person sees on the terminal during `surgery fit`: a step count out of trainer.max_steps (also after a
resume mid-epoch), no library noise, and the results table on lines of its own. Two short runs of the tiny removal
recipe in subprocesses (~50 s), stdout and stderr merged into one stream as a terminal shows them."""

from __future__ import annotations

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
    title = [line for line in resumed if "LayerNorm removal: validation cross-entropy" in line]
    assert title and title[0].strip().startswith("LayerNorm removal"), title  # not glued to the bar's last line
    for noise in NOISE:
        assert not any(noise in line for line in killed + resumed), noise
