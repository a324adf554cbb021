"""A run directory describes one model with one set of settings: the final checkpoint is written at the end of
training (whatever `max_steps` is), a resume with changed settings is refused or recorded, and a second
`surgery fit` into a live run directory is refused."""

import json
import os
import time

import lightning as L
import pytest
import torch

from reliability_setup import fit_args, load, write_setup
from surgery.cli.entry import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dir")
    recipe = write_setup(root)
    old = os.environ.get("SURGERY_CACHE")
    os.environ["SURGERY_CACHE"] = str(root / "cache")
    torch.set_num_threads(1)
    yield root, recipe
    os.environ.pop("SURGERY_CACHE") if old is None else os.environ.__setitem__("SURGERY_CACHE", old)


@pytest.fixture(scope="module")
def finished(setup):
    """16 steps with a checkpoint every 5: the periodic checkpoints fall at 5, 10 and 15."""
    root, recipe = setup
    assert main(fit_args(recipe, root / "a", "--checkpoint.every_n_train_steps", "5")) == 0
    return root / "a"


def test_last_checkpoint_of_a_finished_run_holds_its_final_step(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    from surgery.cli.commands import export

    ckpt = load(finished / "checkpoints" / "last.ckpt")
    metrics = json.loads((finished / "metrics.json").read_text())
    assert ckpt["global_step"] == metrics["steps"] == 16
    root = finished.parent  # where the run started from, as resolved while it trained (for the model card)
    assert metrics["started_from"] == {"name": str(root / "init"), "local_path": str((root / "init").resolve())}
    assert metrics["trained_on"] == {"name": str(root / "corpus.jsonl"), "local_path": str(root.resolve())}
    parser = __import__("argparse").ArgumentParser()
    export.add_arguments(parser)
    assert export.run(parser.parse_args([str(finished / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "m")])) == 0
    ids = torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(finished / "model")(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)  # export of last.ckpt == the run's model/


def test_ckpt_path_last_on_a_finished_run_does_not_train_again(finished):
    import csv

    root = finished.parent
    before = load(finished / "checkpoints" / "last.ckpt")["state_dict"]
    assert main(fit_args(root / "recipe.yaml", finished, "--checkpoint.every_n_train_steps", "5", "--ckpt_path", "last")) == 0
    log = finished / "logs" / "metrics.csv"
    assert not log.exists() or not [r for r in csv.DictReader(log.open()) if r.get("train/loss")]  # no step trained again
    after = load(finished / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 16
    for name, t in before.items():
        assert torch.equal(t, after["state_dict"][name]), name


@pytest.mark.slow
def test_a_finished_run_continued_from_its_final_checkpoint_reads_the_data_as_one_run(finished, setup):
    root, recipe = setup
    longer = ("--checkpoint.every_n_train_steps", "5", "--trainer.max_steps", "20")
    assert main(fit_args(recipe, root / "twenty", *longer)) == 0
    assert main(fit_args(recipe, finished, *longer, "--ckpt_path", "last")) == 0
    a, b = load(root / "twenty" / "checkpoints" / "last.ckpt"), load(finished / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 20
    # The same place in the data: the continued run finished epoch 1 rather than starting epoch 2 at step 16.
    # (Its weights differ: the lr schedule of a 16-step run decays over 16 steps, not 20.)
    assert a["loops"]["fit_loop"]["state_dict"] == b["loops"]["fit_loop"]["state_dict"] == {"combined_loader": [{"epoch": 1, "batches": 10}]}


def interrupted_copy(finished, dest):
    """A copy of the finished run as if it had been killed after its last checkpoint (no metrics.json, no model/)."""
    import shutil

    shutil.copytree(finished, dest)
    (dest / "metrics.json").unlink()
    shutil.rmtree(dest / "model")
    return dest, load(dest / "checkpoints" / "last.ckpt")["global_step"]


CHANGED = ("--model.init_args.lr", "0.002", "--data.init_args.batch_size", "4")


def test_resume_with_changed_settings_is_refused_naming_each_key(finished, tmp_path, capsys):
    run, step = interrupted_copy(finished, tmp_path / "run")
    config_before = (run / "logs" / "config.yaml").read_text()
    assert main(fit_args(finished.parent / "recipe.yaml", run, *CHANGED)) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / 'last.ckpt'} (step {step}) was trained with other settings than this command's:" in err
    assert "  model.init_args.lr: 0.001 (checkpoint) -> 0.002 (now)" in err
    assert "  data.init_args.batch_size: 8 (checkpoint) -> 4 (now)" in err
    assert "Resume with the checkpoint's settings (--model.init_args.lr 0.001 --data.init_args.batch_size 8)" in err
    assert "or pass --checkpoint.accept_changes true to resume with the new settings anyway" in err
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == step  # nothing trained, nothing rewritten
    assert (run / "logs" / "config.yaml").read_text() == config_before and not (run / "metrics.json").exists()
    # Settings that only say how long to run or what to show may change; so may the seed (a recipe without one
    # draws a new one at each start; the checkpoint restores the RNG state and the data order).
    assert main(fit_args(finished.parent / "recipe.yaml", run, "--trainer.max_steps", str(step + 1),
                         "--trainer.log_every_n_steps", "2", "--guard.factor", "4", "--seed_everything", "true")) == 0
    assert "resumed_with_changes" not in json.loads((run / "metrics.json").read_text())


def test_resume_with_accepted_changes_records_them(finished, tmp_path):
    run, step = interrupted_copy(finished, tmp_path / "run")
    assert main(fit_args(finished.parent / "recipe.yaml", run, *CHANGED, "--checkpoint.accept_changes", "true",
                         "--trainer.max_steps", str(step + 2))) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    [record] = metrics["resumed_with_changes"]
    assert record["step"] == step and record["changes"] == {"model.init_args.lr": [0.001, 0.002], "data.init_args.batch_size": [8, 4]}
    assert "learning-rate schedule came from the checkpoint" in record["note"]
    assert json.loads((run / "resume_changes.json").read_text()) == [record]
    assert metrics["tokens_seen"] == step * 8 * 32 + 2 * 4 * 32  # each step counted with the batch size it trained with


class SleepAt(L.Callback):
    """Sleeps for a minute at the start of optimizer step `step` (in a `surgery fit` subprocess)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            time.sleep(60)


@pytest.mark.slow
def test_a_second_fit_into_a_live_run_directory_is_refused(setup, capsys):
    import signal
    import subprocess
    import sys

    root, recipe = setup
    run = root / "live"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "surgery.cli", *fit_args(recipe, run, "--trainer.callbacks+=test_run_dir.SleepAt",
                              "--trainer.callbacks.init_args.step", "6")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.ckpt").exists():  # step 4's checkpoint: the first fit is training
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-3000:] if first.poll() else "timeout"
            time.sleep(0.5)
        lock = json.loads((run / ".fit.lock").read_text())
        assert lock["pid"] == first.pid
        start = time.time()
        assert main(fit_args(recipe, run)) == 2
        assert time.time() - start < 10  # refused before loading anything
        err = capsys.readouterr().err
        assert f"trainer.default_root_dir='{run}' is in use by another surgery fit (pid {first.pid} on this machine, since" in err
        assert "wait for it to finish or stop it, or choose another trainer.default_root_dir" in err
        assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 4  # the live run's checkpoint untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed run's lock is stale: the same command takes it over and resumes.
    assert (run / ".fit.lock").exists()
    assert main(fit_args(recipe, run)) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 16
    assert not (run / ".fit.lock").exists()  # released at the end


def test_a_stale_or_foreign_lock(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from surgery.training import run_lock
    from surgery.errors import SurgeryError

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / ".fit.lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started": "x"}))
    assert run_lock.acquire(tmp_path) == tmp_path / ".fit.lock"  # its process is gone: taken over
    assert json.loads((tmp_path / ".fit.lock").read_text())["pid"] == os.getpid()
    run_lock.release_all()
    assert not (tmp_path / ".fit.lock").exists()
    (tmp_path / ".fit.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(SurgeryError, match=r"in use by another surgery fit \(pid 1 on host 'elsewhere', since 2026-01-01T00:00:00\)"
                                            r".*if that process is gone, delete .*\.fit\.lock"):
        run_lock.acquire(tmp_path)


def test_a_run_directory_that_cannot_be_written_is_refused_before_any_work(setup, tmp_path, capsys):
    root, recipe = setup
    (tmp_path / "file").write_text("")
    assert main(fit_args(recipe, tmp_path / "file" / "run")) == 2  # a file where the run directory's parent should be
    assert f"trainer.default_root_dir='{tmp_path / 'file' / 'run'}' cannot be written (" in capsys.readouterr().err
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            return  # root writes anywhere
        assert main(fit_args(recipe, parent / "run")) == 2
    finally:
        parent.chmod(0o700)
    assert f"trainer.default_root_dir='{parent / 'run'}' cannot be written (Permission denied" in capsys.readouterr().err


def test_a_fit_refused_before_writing_leaves_no_run_directory(setup, tmp_path, capsys):
    root, recipe = setup
    assert main(fit_args(recipe, tmp_path / "new" / "run", "--model.init_args.lr", "-1")) == 2
    assert "model.init_args.lr=-1.0: must be a positive learning rate" in capsys.readouterr().err
    assert not (tmp_path / "new" / "run").exists()
