"""Recipes and checkpoints shipped with surgery: found from any directory, and inside a built wheel.

The wheel test builds the package (`pip wheel --no-deps --no-build-isolation`, ~10 s), checks that every file under
`recipes/` and `checkpoints/` is in it (listed at test time, so files added later are covered), installs it with
`pip install --target` and runs the quick start's parsing and model loading from another directory through the
installed copy. The slow test trains a shortened quick start from the installed copy and from the clone and compares
their numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from surgery.cli.entry import main
from surgery.errors import SurgeryError
from surgery.models.loading import resolve
from surgery.models.shipped import resolve_shipped

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(ROOT).as_posix() for d in ("recipes", "checkpoints") for p in (ROOT / d).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts)
QUICK = ["--trainer.max_steps", "51", "--trainer.val_check_interval", "51", "--data.init_args.block_size", "64",
         "--data.init_args.max_val_blocks", "8", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


def test_every_shipped_file_resolves_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in SHIPPED:
        assert Path(resolve_shipped(name)) == ROOT / name
    assert resolve("checkpoints/tiny-gpt2-stdlib") == (str(ROOT / "checkpoints" / "tiny-gpt2-stdlib"), True)
    assert "is not in the current directory" in capsys.readouterr().err
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("seed_everything: 1\n")
    assert resolve_shipped("recipes/mine.yaml") == "recipes/mine.yaml"  # the current directory comes first


def test_a_path_in_neither_place_names_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SurgeryError) as err:
        resolve_shipped("checkpoints/tiny-gtp2-stdlib")
    assert str(err.value).startswith(
        f"'checkpoints/tiny-gtp2-stdlib' exists neither in the current directory ({tmp_path / 'checkpoints/tiny-gtp2-stdlib'}) "
        f"nor among the files shipped with surgery ({ROOT / 'checkpoints/tiny-gtp2-stdlib'}) (shipped checkpoints/: ")
    assert "tiny-gpt2-stdlib" in str(err.value)
    assert main(["fit", "--config", "recipes/remove_ln/quikstart.yaml"]) == 2


def test_quickstart_recipe_parses_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("surgery.models.shipped._announced", set())  # each path is announced once per process
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "recipes/remove_ln/quickstart.yaml", "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr()
    assert "init: checkpoints/tiny-gpt2-stdlib" in out.out
    assert f"using the copy shipped with surgery: {ROOT / 'recipes/remove_ln/quickstart.yaml'}" in out.err


def _build_and_install(tmp_path: Path) -> Path:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    wheel = next(wheels.glob("lm_surgery-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in SHIPPED if f"surgery/_bundled/{n}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    return target


def _installed(target: Path, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return _build_and_install(tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_installed_wheel_runs_the_quickstart_recipe_from_anywhere(installed, tmp_path):
    probe = ("import surgery, surgery.models.shipped as s; from surgery.models.loading import load_causal_lm, load_tokenizer; "
             "m = load_causal_lm('checkpoints/tiny-gpt2-stdlib'); t = load_tokenizer('checkpoints/tiny-gpt2-stdlib'); "
             "print(surgery.__file__, s.resolve_shipped('recipes/remove_ln/quickstart.yaml'), sum(p.numel() for p in m.parameters()), len(t))")
    run = _installed(installed, tmp_path, "-c", probe)
    assert run.returncode == 0, run.stderr[-2000:]
    module, recipe, params, vocab = run.stdout.split()
    assert module == str(installed / "surgery" / "__init__.py")
    assert recipe == str(installed / "surgery" / "_bundled" / "recipes" / "remove_ln" / "quickstart.yaml")
    assert (int(params), int(vocab)) == (1_350_400, 4096)
    parsed = _installed(installed, tmp_path, "-m", "surgery.cli", "fit", "--config", "recipes/remove_ln/quickstart.yaml", "--print_config")
    assert parsed.returncode == 0 and "init: checkpoints/tiny-gpt2-stdlib" in parsed.stdout, parsed.stderr[-2000:]


@pytest.mark.slow
def test_installed_quickstart_gives_the_clone_numbers(installed, tmp_path):
    """A shortened quick start (51 steps, every LN removed) through the installed wheel from another directory and
    through the clone: the same validation losses, to the last digit (same code, weights, data and seed)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _installed(installed, elsewhere, "-m", "surgery.cli", "fit", "--config", "recipes/remove_ln/quickstart.yaml", *QUICK, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    clone = subprocess.run([sys.executable, "-m", "surgery.cli", "fit", "--config", "recipes/remove_ln/quickstart.yaml", *QUICK,
                            "--trainer.default_root_dir", str(tmp_path / "clone")], cwd=ROOT, capture_output=True, text=True,
                           timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert clone.returncode == 0, clone.stderr[-2000:]
    a = json.loads((elsewhere / "runs/remove_ln/quickstart/metrics.json").read_text())
    b = json.loads((tmp_path / "clone" / "metrics.json").read_text())
    assert a["val_loss"] == b["val_loss"] and a["val"] == b["val"]


def test_benchmarks_are_not_a_command_of_the_installed_package(capsys):
    """The benchmarks live in the source checkout (`python -m benchmarks`), not in the wheel: no `surgery bench`."""
    assert main(["bench"]) == 2
    assert "unknown command 'bench'" in capsys.readouterr().err


def test_a_loaded_gpt2_names_its_loss_so_transformers_does_not_warn():
    """GPT2LMHeadModel's class name maps to no loss in transformers, which then warns `loss_type=None ... unrecognized`
    and uses the next-token loss anyway; the loader names that loss, and the loss is unchanged."""
    import torch
    import torch.nn.functional as F

    from surgery.models.loading import load_causal_lm

    model = load_causal_lm("checkpoints/tiny-gpt2-stdlib")
    assert model.loss_type == "ForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(out.loss, expected, atol=1e-6)
