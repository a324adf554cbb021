"""`surgery eval` and `surgery export` on what users pass them: a run's `.ckpt` (with and without the tokenizer it
recorded), block sizes and block counts the model or the data cannot take, an `--out` that is a file. One tiny
removal run (reliability_setup, ~20 s) is shared by the tests."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from reliability_setup import fit_args, write_setup
from surgery.cli.entry import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    recipe = write_setup(root, dropout=0.0)
    import os

    os.environ["SURGERY_CACHE"] = str(root / "cache")
    assert main(fit_args(recipe, root / "run")) == 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])  # text for eval, scored whole (--split all, the default for a file)
    (root / "eval.txt").write_text("".join((stdlib / f).read_text() for f in ("textwrap.py", "string.py", "glob.py")))
    return root


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_of_a_checkpoint_finds_the_tokenizer_its_run_recorded(run, tmp_path, capsys):
    ckpt = run / "run" / "checkpoints" / "last.ckpt"
    data = ["--data", str(run / "eval.txt"), "--block-size", "32", "--json"]
    assert main(["eval", str(ckpt), *data, str(tmp_path / "ckpt.json")]) == 0
    assert main(["eval", str(run / "run" / "model"), *data, str(tmp_path / "model.json")]) == 0
    from_ckpt, from_model = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ckpt", "model"))
    # the .ckpt holds the fine-tuned model with fake LNs, model/ its LN-free export: the same function
    assert from_ckpt["tokens"] == from_model["tokens"] and from_ckpt["loss"] == pytest.approx(from_model["loss"], abs=1e-4)
    # without <run>/model, the run's data.tokenizer (recorded in the checkpoint) is used
    moved = tmp_path / "elsewhere" / "checkpoints"
    moved.mkdir(parents=True)
    shutil.copy(ckpt, moved / "last.ckpt")
    assert main(["eval", str(moved / "last.ckpt"), *data, str(tmp_path / "moved.json")]) == 0
    assert json.loads((tmp_path / "moved.json").read_text())["loss"] == from_ckpt["loss"]


def test_eval_of_a_checkpoint_whose_tokenizer_is_gone_says_what_to_pass(run, tmp_path, capsys):
    import torch

    ckpt = torch.load(run / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["callbacks"]["RunCheckpoint"]["config"]["data"]["init_args"]["tokenizer"] = str(tmp_path / "gone")
    ckpt["hyper_parameters"]["init"] = str(tmp_path / "gone-init")
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "r" / "checkpoints" / "last.ckpt")
    code, _, err = _eval(capsys, str(tmp_path / "r" / "checkpoints" / "last.ckpt"), "--data", str(run / "eval.txt"),
                         "--block-size", "32")
    assert code == 2
    assert (f"no tokenizer found for checkpoint '{tmp_path / 'r/checkpoints/last.ckpt'}' (tried: {tmp_path / 'r/model'}, "
            f"{tmp_path / 'gone'}, {tmp_path / 'gone-init'}): pass --tokenizer with the run's data.tokenizer") in err


@pytest.mark.parametrize("args, message", [
    (["--block-size", "128"], "--block-size 128: the model has only 64 positions; pass --block-size 64 or less"),
    (["--block-size", "1"], "--block-size 1: a block needs at least 2 tokens"),
    (["--max-blocks", "0"], "--max-blocks 0: evaluate at least one block, or omit --max-blocks to score every block of the split"),
    (["--batch-size", "0"], "--batch-size 0: pass a positive number of blocks per batch"),
])
def test_eval_refuses_sizes_the_model_or_data_cannot_take(run, capsys, args, message):
    code, _, err = _eval(capsys, str(run / "run" / "model"), "--data", str(run / "eval.txt"), *args)
    assert code == 2 and f"surgery eval: error: {message}" in err, err[-1500:]


def test_export_onto_a_file_is_refused_before_loading(run, tmp_path, capsys):
    ckpt = str(run / "run" / "checkpoints" / "last.ckpt")
    (tmp_path / "model.safetensors").write_text("")
    assert main(["export", ckpt, "--out", str(tmp_path / "model.safetensors")]) == 2
    assert f"--out '{tmp_path / 'model.safetensors'}' is a file, not a directory" in capsys.readouterr().err
    assert main(["export", ckpt, "--out", str(tmp_path / "model.safetensors" / "x")]) == 2
    assert f"cannot be created: '{tmp_path / 'model.safetensors'}' is a file" in capsys.readouterr().err
    assert main(["export", ckpt, "--out", str(tmp_path / "ok")]) == 0  # the tokenizer: the one the run recorded
    assert (tmp_path / "ok" / "tokenizer.json").exists()


@pytest.mark.parametrize("content", [b"not a mask\n", b"\x00" * 4])
def test_a_mask_file_that_is_not_safetensors_is_named(tmp_path, content):
    from surgery.errors import SurgeryError
    from surgery.ln_tune.mask import EntryMask

    (tmp_path / "mask.txt").write_bytes(content)
    with pytest.raises(SurgeryError) as err:
        EntryMask.load(tmp_path / "mask.txt")
    assert str(err.value).startswith(f"mask file '{tmp_path / 'mask.txt'}' is not a safetensors file (")
    assert str(err.value).endswith("pass the masks.safetensors an LN-tuning run wrote (<run>/masks.safetensors)")
