"""Distilled transfer: attention alignment (stage 1) against an independent computation, gradients reaching
the mixers only, the teacher untouched, stages by step (and so across a resume), the guard's monitor."""

import lightning as L
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from surgery.data.resumable import EpochShuffle, ResumableLoader
from surgery.training.distill import DistillConfig, Teacher
from surgery.errors import SurgeryError
from surgery.xatl.training.align import AttentionAligner
from surgery.xatl.hybrid.model import HybridGPT2LMHeadModel, hybrid_config_from
from surgery.xatl.training.module import AlignStage, UnfreezeSchedule, XatlLM
from surgery.xatl.transfer.weights import transfer_shared_weights



def source() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    with torch.no_grad():  # away from the initial values: LN gains and biases matter, attention is not uniform
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    source().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("mixer", ["mamba", "gla"])
def test_alignment_loss_equals_an_independent_computation(mixer):
    src = source()
    student = HybridGPT2LMHeadModel(hybrid_config_from(src.config, mixer, {"expand": 1} if mixer == "mamba" else {},
                                                       attn_layers=[1]))
    transfer_shared_weights(src, student, ["embeddings", "norms", "mlp", "lm_head", "attn_layers"])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, per_layer = AttentionAligner(Teacher(src), student.mixer_layers())(student, ids)
    assert sorted(per_layer) == [0, 2]
    # reference: run the source block by block by hand
    x = src.transformer.wte(ids) + src.transformer.wpe(torch.arange(16))[None]
    want = {}
    with torch.no_grad():
        for i, block in enumerate(src.transformer.h):
            h = block.ln_1(x)
            a = block.attn(h)[0]
            if i in per_layer:
                m = student.transformer.h[i].attn.mixer(h)[0]
                want[i] = (((m - a) ** 2).sum(-1) / (a**2).sum(-1)).mean()
            x = x + a
            x = x + block.mlp(block.ln_2(x))
    for i in per_layer:
        torch.testing.assert_close(per_layer[i], want[i], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), (want[0] + want[2]) / 2, rtol=1e-5, atol=1e-7)
    loss.backward()  # gradients reach the mixers and nothing else
    for n, p in student.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (".mixer." in n and "h.1." not in n), n


def loader() -> ResumableLoader:
    """Random blocks in a fixed order that a resumed run continues mid-epoch (as TokenBlocks' loader does)."""
    blocks = [torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(i)) for i in range(64)]
    return ResumableLoader(blocks, batch_size=4, sampler=EpochShuffle(64, seed=0), drop_last=True)


def fit(module, steps: int, ckpt_path=None, **kw):
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, **kw)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


class StopAt(L.Callback):
    """Ends training once `step` optimizer steps are done (a kill, as far as the checkpoint is concerned)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class StageLog(L.Callback):
    def __init__(self):
        self.stages, self.monitors = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stages.append(pl_module.stage(trainer.global_step - 1))
        self.monitors.append(float(pl_module.spike_monitor))


def test_stages_follow_the_step_teacher_untouched_and_resume(source_dir, tmp_path):
    # settings as plain values, as the CLI stores them (a checkpoint loads with weights_only=True)
    kw = dict(mixer="retention", align={"steps": 3}, distill={"lm_weight": 0, "kl_weight": 1}, lm_after=6,
              unfreeze={"step": 4, "warmup_steps": 1}, lr=1e-2, warmup_steps=1)
    module = XatlLM(source_dir, **kw)
    teacher = {n: p.detach().clone() for n, p in module.distiller.teacher.model.named_parameters()}
    assert not any(n.startswith("teacher") for n in module.state_dict())  # not saved with the student
    log = StageLog()
    fit(module, 8, callbacks=[log], enable_checkpointing=False)
    assert log.stages == ["align"] * 3 + ["distill"] * 3 + ["lm"] * 2
    # the guard's monitor is the next-token CE throughout: no jump of scale at a stage change
    assert all(3.0 < m < 5.5 for m in log.monitors)
    for n, p in module.distiller.teacher.model.named_parameters():
        assert torch.equal(p, teacher[n]) and p.grad is None, n
    assert module.aligner.teacher is module.distiller.teacher  # one teacher for both stages
    assert module.align == AlignStage(steps=3) and module.unfreeze_schedule == UnfreezeSchedule(step=4, warmup_steps=1)
    # stopped after step 4 (inside stage 2) and resumed: it goes on in the stage it left (the weights of a
    # resumed CLI run equal an uninterrupted one's: tests/test_resume.py)
    first = XatlLM(source_dir, **kw)
    ckpt_dir = tmp_path / "ck"
    from lightning.pytorch.callbacks import ModelCheckpoint

    fit(first, 8, callbacks=[StopAt(4), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], default_root_dir=tmp_path)
    assert first.global_step == 4
    resumed, log2 = XatlLM(source_dir, **kw), StageLog()
    fit(resumed, 8, ckpt_path=str(ckpt_dir / "last.ckpt"), callbacks=[log2], enable_checkpointing=False,
        default_root_dir=tmp_path)
    assert log2.stages == ["distill"] * 2 + ["lm"] * 2 and resumed.unfrozen_at == 4
    for n, p in resumed.distiller.teacher.model.named_parameters():  # the teacher is the source again
        assert torch.equal(p, teacher[n]), n


def test_teacher_stages_need_a_transfer(source_dir):
    with pytest.raises(SurgeryError, match="make no sense for a model trained from scratch"):
        XatlLM(source_dir, transfer=[], freeze=False, align=AlignStage(steps=5))
    with pytest.raises(SurgeryError, match="make no sense for a model trained from scratch"):
        XatlLM(source_dir, transfer=[], freeze=False, distill=DistillConfig(kl_weight=1))


def test_comparison_reports_the_source_on_the_full_split(tmp_path):
    import json

    from surgery.cli.commands.compare import full_validation

    for arm, body in {"xatl": {"val": {"loss": 4.0}, "xatl": {"source_val_loss": 3.7}},
                      "scratch": {"val": {"loss": 5.5}}}.items():
        (tmp_path / arm).mkdir()
        (tmp_path / arm / "metrics.json").write_text(json.dumps(body))
    got = full_validation(tmp_path)
    assert got["source_full_val"] == 3.7 and got["xatl_full_val"] == 4.0 and got["scratch_full_val"] == 5.5
    assert got["xatl_gap_vs_source"] == pytest.approx(0.3)
    (tmp_path / "scratch" / "metrics.json").unlink()
    assert full_validation(tmp_path)["scratch_full_val"] is None


class TrainBlocks(L.LightningDataModule):
    """What attn_layers: auto reads from a data module: split("train") and batch_size; the validation split is
    not for choosing layers."""

    def __init__(self):
        super().__init__()
        self.batch_size = 4
        self.blocks = [torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(100 + i)) for i in range(16)]

    def split(self, name):
        if name != "train":
            raise AssertionError(f"attn_layers: auto read the {name} split")
        return self.blocks

    def train_dataloader(self):
        return loader()


def test_auto_kl_criterion_measures_each_layer_replaced_alone(source_dir):
    """A block whose attention writes nothing (output projection zeroed) costs nothing when its mixer (given
    that zero projection) replaces it alone: KL 0 by the "kl" criterion, ranked last; the others cost > 0."""
    from surgery.xatl.training.auto_layers import rank_layers

    src = GPT2LMHeadModel.from_pretrained(source_dir)
    with torch.no_grad():
        for p in src.parameters():  # randomized weights of order one: every attention matters
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        src.transformer.h[1].attn.c_proj.weight.zero_()
        src.transformer.h[1].attn.c_proj.bias.zero_()
    batches = [torch.stack(TrainBlocks().blocks[i : i + 4]) for i in range(0, 8, 4)]
    kl = rank_layers(src, "retention", None, batches, ["attn_out", "qkv"], steps=3, seed=0, criterion="kl")
    assert kl[-1][0] == 1 and abs(kl[-1][1]) < 1e-6 and min(c for _, c in kl[:-1]) > 1e-3


def test_auto_attention_layers_are_the_costliest_and_deterministic(source_dir):
    from surgery.xatl.training.auto_layers import choose_layers, rank_layers

    src = GPT2LMHeadModel.from_pretrained(source_dir)
    batches = [torch.stack(TrainBlocks().blocks[i : i + 4]) for i in range(0, 16, 4)]
    one = rank_layers(src, "retention", None, batches, ["attn_out", "qkv"], steps=4, seed=3)
    assert one == rank_layers(src, "retention", None, batches, ["attn_out", "qkv"], steps=4, seed=3)
    assert sorted(i for i, _ in one) == [0, 1, 2] and [e for _, e in one] == sorted((e for _, e in one), reverse=True)
    assert choose_layers(one, 2) == sorted([one[0][0], one[1][0]])
    with pytest.raises(SurgeryError, match="keeps 3 attention layer"):
        choose_layers(one, 3)
    with pytest.raises(SurgeryError, match=r"auto_attn.criterion 'loss': choose one of kl, alignment"):
        XatlLM(source_dir, mixer="retention", attn_layers="auto", auto_attn={"criterion": "loss"})
    # in a run: the model is rebuilt with the chosen layers before training; the ranking is reported
    module = XatlLM(source_dir, mixer="retention", attn_layers="auto", auto_attn={"keep": 1, "steps": 4, "batches": 4, "seed": 3},
                    transfer=["embeddings", "norms", "mlp", "lm_head", "attn_layers", "attn_out", "qkv"],
                    unfreeze={"step": 1})  # unfrozen within this 2-step run
    assert module.model.config.attn_layers == []
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=TrainBlocks())
    assert module.model.config.attn_layers == [one[0][0]] and module.ranking == one
    kept = module.model.transformer.h[one[0][0]].attn
    assert type(kept).__name__ == "GPT2Attention"  # copied whole, frozen so far
    assert torch.equal(kept.c_attn.weight, src.transformer.h[one[0][0]].attn.c_attn.weight)
    assert module.run_metrics()["xatl"]["attn_layers"] == [one[0][0]]
    assert module.run_metrics()["xatl"]["attn_layer_criterion"] == "kl"
    with pytest.raises(SurgeryError, match="resume with attn_layers"):
        XatlLM(source_dir, mixer="retention", attn_layers=[2] if one[0][0] != 2 else [0]).on_load_checkpoint(
            {"hf_config": {"attn_layers": [one[0][0]]}})
