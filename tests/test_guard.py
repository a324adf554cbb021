"""The divergence guard on a tiny removal run with an injected loss spike (x100), NaN loss or NaN gradient at step 5:
the step is not applied, the event names the LN removed last, and skip / rollback / stop behave."""

import json
import math

import lightning as L
import pytest
import torch

from reliability_setup import SpikyRemoval, write_setup
from surgery.cli.entry import main
from surgery.data import TokenBlocks
from surgery.errors import SurgeryError
from surgery.training.guard import DivergenceGuard
from surgery.cli.lightning_cli import RunCheckpoint
from surgery.training.lm import cosine_with_warmup
from surgery.remove_ln.schedule import RemovalSchedule

SCHEDULE = RemovalSchedule(start=1, gaps={"ln_2": 1, "ln_1_qk": 1, "ln_1_v": 1, "ln_f": 1})  # steps 1..7
LR = 1e-3


class Recorder(L.Callback):
    """State at the start of each step (= after the previous one): parameters, buffers, learning rate."""

    def __init__(self):
        self.params, self.buffers, self.lr = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        s = trainer.global_step
        self.params[s] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()
        self.buffers[s] = {n: b.clone() for n, b in pl_module.named_buffers()}
        self.lr[s] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    write_setup(root, dropout=0.0)
    import os
    os.environ.setdefault("SURGERY_CACHE", str(root / "cache"))
    dm = TokenBlocks(data=str(root / "corpus.jsonl"), tokenizer=str(root / "init"), val_fraction=0.2, block_size=32,
                     batch_size=8, max_val_blocks=2)
    return root, dm


def fit(setup, run_dir, guard, spikes, max_steps=9):
    root, dm = setup
    torch.manual_seed(0)
    model = SpikyRemoval(init=str(root / "init"), schedule=SCHEDULE, spikes=spikes, warmup_steps=1, lr=LR,
                         tokenizer=dm.tokenizer)
    rec = Recorder()
    trainer = L.Trainer(max_steps=max_steps, callbacks=[guard, rec, RunCheckpoint(every_n_train_steps=3)],
                        default_root_dir=run_dir, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return model, rec


@pytest.mark.parametrize("spike", [100.0, math.nan])
def test_skip_leaves_weights_and_averages_untouched(setup, tmp_path, spike):
    guard = DivergenceGuard(action="skip", warmup_steps=2)
    model, rec = fit(setup, tmp_path, guard, {5: spike})
    assert torch.equal(rec.params[6], rec.params[5])  # step 5 applied nothing
    assert not torch.equal(rec.params[5], rec.params[4]) and not torch.equal(rec.params[7], rec.params[6])
    # The fake LNs' buffers after step 5 are those its forward started from (removal of h.0.ln_1_v at step 5 kept).
    after5, before5 = rec.buffers[6], rec.buffers[5]
    real_at_5 = [n for n in after5 if n.endswith(".avg_std") and float(after5[n.replace("avg_std", "fake")]) == 0]
    assert real_at_5 and all(torch.equal(after5[n], before5[n]) for n in real_at_5)
    [event] = guard.events
    assert event["step"] == 5 and event["action"] == "skip"
    assert event["last_removed"].startswith("h.0.ln_1_v (removed at step 5, sigma ")
    assert ("non-finite" in event["reason"]) == math.isnan(spike)
    assert json.loads((tmp_path / "guard_events.json").read_text()) == guard.events
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.good_steps == 8


def test_rollback_restores_last_checkpoint_with_lower_lr(setup, tmp_path):
    guard = DivergenceGuard(action="rollback", warmup_steps=2, lr_scale=0.5)
    _, rec = fit(setup, tmp_path, guard, {5: 100.0})
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # later overwritten at step 9
    assert ckpt["global_step"] == 9
    assert torch.equal(rec.params[6], rec.params[3])  # after the bad step 5: the weights of the step-3 checkpoint
    for s in (6, 7, 8):
        assert rec.lr[s] == pytest.approx(0.5 * LR * cosine_with_warmup(s, 1, 9, 0.5), rel=1e-6)
    assert rec.lr[4] == pytest.approx(LR * cosine_with_warmup(4, 1, 9, 0.5), rel=1e-6)
    [event] = guard.events
    assert event["action"].startswith("rollback to step 3 (") and event["action"].endswith("learning rate x0.5")
    assert guard.rollbacks == 1 and ckpt["callbacks"]["DivergenceGuard"]["rollbacks"] == 1


def test_stop_raises_with_step_loss_and_last_removed_ln(setup, tmp_path):
    guard = DivergenceGuard(action="stop", warmup_steps=2)
    with pytest.raises(SurgeryError) as err:
        fit(setup, tmp_path, guard, {5: math.nan})
    msg = str(err.value)
    assert msg.startswith("divergence guard stopped the run at step 5: non-finite loss (loss nan); the update was not applied "
                          "(last LayerNorm removed: h.0.ln_1_v (removed at step 5, sigma ")
    assert "resume it (--ckpt_path last) with a lower model.init_args.lr" in msg


def test_non_finite_gradient_of_a_finite_loss_is_not_applied(setup, tmp_path):
    guard = DivergenceGuard(action="skip", warmup_steps=2)
    model, rec = fit(setup, tmp_path, guard, {5: "nan-grad"})
    assert torch.equal(rec.params[6], rec.params[5]) and not torch.equal(rec.params[7], rec.params[6])
    [event] = guard.events
    assert event["step"] == 5 and event["reason"] == "non-finite gradient" and math.isfinite(event["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_bad_steps_stop_a_skipping_run(setup, tmp_path):
    guard = DivergenceGuard(action="skip", warmup_steps=2, max_bad_steps=2)
    with pytest.raises(SurgeryError, match="divergence guard stopped the run at step 6: non-finite loss"):
        fit(setup, tmp_path, guard, {5: math.nan, 6: math.nan})
    assert [e["action"] for e in guard.events] == ["skip", "stop"]


@pytest.mark.parametrize("kwargs, message", [
    ({"factor": 1.0}, "guard.factor=1.0: a spike threshold must exceed 1"),
    ({"lr_scale": 0.0}, "guard.lr_scale=0.0: must be in (0, 1]"),
    ({"max_bad_steps": 0}, "need 0 <= momentum < 1, warmup_steps >= 0 and max_bad_steps >= 1"),
])
def test_bad_guard_settings(kwargs, message):
    with pytest.raises(SurgeryError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        DivergenceGuard(**kwargs)
