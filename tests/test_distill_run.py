"""Distillation inside LN-removal training: the teacher stays out of the optimizer and the checkpoints and
ends bit-identical; a run killed mid-schedule resumes with a working teacher; the divergence guard stays
quiet on a healthy KL run whose raw loss triples, and fires on an injected spike."""

import os

import lightning as L
import pytest
import torch

from reliability_setup import ROOT, fit_args, fit_subprocess, load, write_setup
from surgery.cli.entry import main
from surgery.data import TokenBlocks
from surgery.training.distill import DistillConfig
from surgery.training.guard import DivergenceGuard
from surgery.cli.lightning_cli import RunCheckpoint
from surgery.models.loading import load_causal_lm
from surgery.remove_ln.module import LNRemoval
from surgery.remove_ln.schedule import RemovalSchedule

DISTILL = DistillConfig(lm_weight=0.5, kl_weight=1.0, hidden_weight=0.5)
DISTILL_ARGS = ["--model.init_args.distill.lm_weight", "0.5", "--model.init_args.distill.kl_weight", "1.0",
                "--model.init_args.distill.hidden_weight", "0.5"]
TINY = str(ROOT / "checkpoints" / "tiny-gpt2-stdlib")  # a trained model: its KL to itself starts at 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    recipe = write_setup(root)  # dropout 0.1: a teacher left in training mode would give noisy targets
    old = os.environ.get("SURGERY_CACHE")
    os.environ["SURGERY_CACHE"] = str(root / "cache")
    dm = TokenBlocks(data=str(root / "corpus.jsonl"), tokenizer=str(root / "init"), val_fraction=0.2, block_size=32,
                     batch_size=8, max_val_blocks=2)
    yield root, recipe, dm
    os.environ.pop("SURGERY_CACHE") if old is None else os.environ.__setitem__("SURGERY_CACHE", old)


def trainer(run_dir, *callbacks, max_steps=8):
    return L.Trainer(max_steps=max_steps, callbacks=list(callbacks), default_root_dir=run_dir, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                     num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0)


def test_teacher_is_frozen_outside_optimizer_and_checkpoint(setup, tmp_path):
    root, _, dm = setup
    torch.manual_seed(0)
    module = LNRemoval(init=str(root / "init"), schedule=RemovalSchedule(start=1, gaps={"ln_2": 1, "ln_1_qk": 1, "ln_1_v": 1, "ln_f": 1}),
                       control=True, distill=DISTILL, warmup_steps=1, lr=1e-3, tokenizer=dm.tokenizer)
    teacher = module.distiller.teacher.model
    trainer(tmp_path, RunCheckpoint(every_n_train_steps=4)).fit(module, datamodule=dm)
    original = load_causal_lm(str(root / "init")).state_dict()
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())  # bit-identical after 8 steps
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not torch.equal(module.model.lm_head.weight, original["lm_head.weight"])  # while the student trained
    in_optimizer = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert set(ckpt["state_dict"]) == set(module.state_dict())
    assert not any(k.startswith(("distiller", "teacher")) for k in ckpt["state_dict"])
    n_model = sum(1 for k in ckpt["state_dict"] if k.startswith(("model.", "control.")))
    assert n_model == len(ckpt["state_dict"])  # the student and its control, nothing else


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_teacher(setup):
    """Uninterrupted (a) vs SIGKILLed at step 14 and restarted (b): the same weights. The KL and the hidden
    alignment reach every step's gradient, so a teacher rebuilt from the trained weights, or left in training
    mode (dropout), would end elsewhere; (c) without a teacher shows how far."""
    root, recipe, _ = setup
    cache = root / "cache"
    torch.set_num_threads(1)
    assert main(fit_args(recipe, root / "a", *DISTILL_ARGS, "--export.enabled", "false")) == 0
    killed = fit_subprocess(fit_args(recipe, root / "b", *DISTILL_ARGS, "--export.enabled", "false",
                                     "--trainer.callbacks+=reliability_setup.KillAt", "--trainer.callbacks.init_args.step", "14"), cache)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert load(root / "b" / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert main(fit_args(recipe, root / "b", *DISTILL_ARGS, "--export.enabled", "false")) == 0
    assert main(fit_args(recipe, root / "c", "--model.init_args.distill.lm_weight", "0.5", "--export.enabled", "false")) == 0
    a, b, c = (load(root / r / "checkpoints" / "last.ckpt") for r in "abc")
    assert a["global_step"] == b["global_step"] == 16
    assert a["hyper_parameters"]["distill"]["kl_weight"] == 1.0
    for name, t in a["state_dict"].items():
        assert torch.allclose(t, b["state_dict"][name], atol=1e-6, rtol=0), name
    far = max((a["state_dict"][k] - c["state_dict"][k]).abs().max().item() for k in a["state_dict"] if ".ln_" not in k)
    assert far > 1e-3


class RawLossRule(L.Callback):
    """The old guard rule on the raw training loss (average of the good steps, momentum 0.9, 2 warm-up
    steps): steps at which it would have called a spike of more than 3x."""

    def __init__(self):
        self.average, self.seen, self.spikes, self.monitored = None, 0, [], []

    def on_before_backward(self, trainer, pl_module, loss):
        value = float(loss.detach())
        if self.average is not None and self.seen >= 2 and value > 3 * self.average:
            self.spikes.append(trainer.global_step)
        self.average = value if self.average is None else 0.9 * self.average + 0.1 * value
        self.seen += 1
        self.monitored.append(float(pl_module.spike_monitor))


def kl_removal(dm, spikes=None):
    module = LNRemoval(init=TINY, schedule=RemovalSchedule(start=2, gaps={"ln_2": 1, "ln_1_qk": 1, "ln_1_v": 1, "ln_f": 1}),
                       distill=DistillConfig(lm_weight=0.0, kl_weight=1.0), warmup_steps=1, lr=1e-3, tokenizer=dm.tokenizer)
    if spikes:  # logits x factor at the given steps: a real divergence of the student, not a scaled loss
        def scale(mod, args, output):
            return output * spikes.get(module.trainer.global_step, 1.0)
        module.model.lm_head.register_forward_hook(scale)
    return module


def test_guard_stays_quiet_on_a_healthy_kl_removal(setup, tmp_path):
    *_, dm = setup
    torch.manual_seed(0)
    guard, raw = DivergenceGuard(action="stop", warmup_steps=2), RawLossRule()
    module = kl_removal(dm)
    trainer(tmp_path, guard, raw, max_steps=16).fit(module, datamodule=dm)  # 13 removals, steps 2..14
    assert raw.spikes  # the KL starts near 0: judged on the raw loss, a removal looks like a > 3x spike
    assert guard.events == [] and guard.good_steps == 16  # judged on the cross-entropy, nothing is wrong
    assert max(raw.monitored) < 1.5 * min(raw.monitored)


def test_guard_fires_on_an_injected_spike_in_a_kl_removal(setup, tmp_path):
    *_, dm = setup
    torch.manual_seed(0)
    guard = DivergenceGuard(action="skip", warmup_steps=2)
    module = kl_removal(dm, spikes={6: 30.0})
    weights = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights[trainer.global_step] = pl_module.model.lm_head.weight.detach().clone()

    trainer(tmp_path, guard, Snapshot(), max_steps=16).fit(module, datamodule=dm)
    [event] = guard.events
    assert event["step"] == 6 and event["action"] == "skip" and event["reason"].startswith("loss above 3 x its moving average")
    assert event["loss"] > 3 * event["average"] and event["average"] > 1.0  # on the cross-entropy's scale (nats/token)
    assert torch.equal(weights[7], weights[6]) and not torch.equal(weights[8], weights[7])
