"""Freeze -> unfreeze training: frozen tensors bit-identical until the unfreeze step, moving after it;
the schedule's state in the checkpoint; the loss-threshold criterion."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from surgery.errors import SurgeryError
from surgery.xatl.training.module import UnfreezeSchedule, UnfreezeTransferred, XatlLM



@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                               resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).save_pretrained(path)
    return str(path)


class Snapshots(L.Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.by_step[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def fit(module, steps: int, callbacks=(), **kw):
    torch.manual_seed(0)
    blocks = [torch.randint(0, 64, (32,)) for _ in range(64)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kw)
    trainer.fit(module, DataLoader(blocks, batch_size=4))
    return trainer


@pytest.mark.parametrize("mixer", ["mamba", "retention"])
def test_transferred_weights_frozen_until_the_unfreeze_step(source_dir, mixer, tmp_path):
    module = XatlLM(source_dir, mixer=mixer, unfreeze=UnfreezeSchedule(step=3, warmup_steps=2), lr=1e-2, warmup_steps=1)
    src = dict(GPT2LMHeadModel.from_pretrained(source_dir).named_parameters())
    frozen = module.transferred
    assert "transformer.wte.weight" in frozen and "transformer.h.0.mlp.c_fc.weight" in frozen
    snap = Snapshots()
    trainer = fit(module, 6, [snap])
    assert module.unfrozen_at == 3
    for step in range(4):  # before steps 0..3 the transferred tensors are the source's, bit for bit
        for n in frozen:
            assert torch.equal(snap.by_step[step][n], src[n]), (step, n)
    final = dict(module.model.named_parameters())
    assert all(not torch.equal(final[n], src[n]) for n in frozen)  # all moved after unfreezing
    mixer_names = [n for n in final if ".mixer." in n]
    assert all(not torch.equal(snap.by_step[1][n], snap.by_step[0][n]) for n in mixer_names if "D" != n[-1])
    ckpt = tmp_path / "x.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["xatl_unfrozen_at"] == 3 and state["hf_config"]["model_type"] == "hybrid_gpt2"
    assert any("UnfreezeTransferred" in k for k in state["callbacks"])
    again = XatlLM(source_dir, mixer=mixer, unfreeze=UnfreezeSchedule(step=3))
    assert not again.model.transformer.wte.weight.requires_grad
    again.on_load_checkpoint(state)
    assert again.unfrozen_at == 3 and again.model.transformer.wte.weight.requires_grad


def test_no_unfreeze_step_nor_threshold_keeps_the_transferred_weights_as_copied(source_dir):
    module = XatlLM(source_dir, mixer="gla", unfreeze=UnfreezeSchedule(step=None, threshold=None), lr=1e-2,
                    warmup_steps=1)
    src = dict(GPT2LMHeadModel.from_pretrained(source_dir).named_parameters())
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit(module, 5)
    final = dict(module.model.named_parameters())
    assert module.unfrozen_at is None and module.transferred
    assert all(torch.equal(final[n], src[n]) and not final[n].requires_grad for n in module.transferred)
    trained = [n for n in final if n not in module.transferred]
    assert trained and all(".mixer." in n for n in trained)
    assert sum(not torch.equal(final[n], before[n]) for n in trained) >= len(trained) - 1  # the mixers trained


def test_scratch_control_trains_everything(source_dir):
    module = XatlLM(source_dir, mixer="gla", transfer=[])
    src = GPT2LMHeadModel.from_pretrained(source_dir)
    assert module.transferred == [] and module.unfrozen_at == 0 and module.configure_callbacks() == []
    assert all(p.requires_grad for p in module.model.parameters())
    assert not torch.equal(module.model.transformer.wte.weight, src.transformer.wte.weight)
    before = module.model.transformer.wte.weight.detach().clone()
    fit(module, 2)
    assert not torch.equal(module.model.transformer.wte.weight, before)


def test_weight_decay_spares_mamba_A_log_and_vectors(source_dir):
    """As in mamba-ssm, A_log (a matrix) gets no weight decay, nor do biases, gains and D; other matrices do,
    in the mixers' optimizer groups and the transferred weights' alike."""
    module = XatlLM(source_dir, mixer="mamba", weight_decay=0.3, unfreeze=UnfreezeSchedule(step=None))
    trainer = fit(module, 1)
    wd = {id(p): g["weight_decay"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    params = dict(module.model.named_parameters())
    assert len(wd) == len(params)
    spared = {n for n, p in params.items() if wd[id(p)] == 0.0}
    assert spared == {n for n, p in params.items() if p.ndim < 2 or n.endswith(".A_log")}
    assert any(n.endswith(".A_log") for n in spared) and all(wd[id(p)] == 0.3 for n, p in params.items() if n not in spared)


def test_threshold_criterion():
    cb = UnfreezeTransferred(UnfreezeSchedule(step=None, threshold=0.05, window=2))
    module = SimpleNamespace(unfrozen_at=None, transferred=["w"])
    module.unfreeze = lambda step: setattr(module, "unfrozen_at", step)
    losses = [4.0, 4.0, 3.0, 3.0, 2.9, 2.9, 2.8]  # windows: 4.0 -> 3.0 (-25%) -> 2.9 (-3.3% < 5%)
    for step, loss in enumerate(losses, start=1):
        cb.on_train_batch_end(SimpleNamespace(global_step=step), module, {"loss": torch.tensor(loss)}, None, 0)
    assert module.unfrozen_at == 6
    restored = UnfreezeTransferred(UnfreezeSchedule(step=None, threshold=0.05, window=2))
    restored.load_state_dict(cb.state_dict())
    assert restored.prev_window_loss == pytest.approx(2.9)


def test_hyperparameters_are_the_init_arguments(source_dir):
    """All constructor arguments but the tokenizer reach hparams (and so the checkpoint and the logs)."""
    module = XatlLM(source_dir, mixer="gla", lr=3e-3, weight_decay=0.05, unfreeze=UnfreezeSchedule(step=7))
    hp = module.hparams
    assert hp.source == source_dir and hp.mixer == "gla" and hp.lr == 3e-3 and hp.weight_decay == 0.05
    assert hp.unfreeze.step == 7 and "tokenizer" not in hp
    assert set(hp) == {"source", "mixer", "mixer_config", "attn_layers", "transfer", "freeze", "unfreeze", "lr",
                       "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "align", "distill", "lm_after",
                       "auto_attn", "compile"}


def test_errors(source_dir):
    tok = SimpleNamespace(__len__=None)
    with pytest.raises(SurgeryError, match="the tokenizer has 100 entries but .* embeds only 64"):
        XatlLM(source_dir, tokenizer=type("Tok", (), {"__len__": lambda self: 100})())
    del tok
    # a kept attention layer that the transfer does not copy would start random (the quick starts' hybrids did)
    for layers in ([1], "auto"):
        with pytest.raises(SurgeryError, match=r"keeps softmax attention, but transfer \['mlp', 'qkv'\] does not copy it: "
                                               r"the kept layers would start from random weights. Add attn_layers to transfer"):
            XatlLM(source_dir, mixer="gla", attn_layers=layers, transfer=["mlp", "qkv"])
