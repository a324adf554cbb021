"""Staged XATL training from GPT-NeoX and Llama sources: the stages run in order, the alignment targets are
the source's own attention, transferred tensors stay bit-identical until they unfreeze, attn_layers: auto."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from surgery.training.distill import Teacher, hidden_alignment
from surgery.families import family_of, get_module
from surgery.xatl.training.align import AttentionAligner
from surgery.xatl.transfer.weights import COMPONENTS
from surgery.xatl.training.module import XatlLM
from remove_ln_models import tiny_model
from xatl_models import attn, source_and_hybrid

FAMILY_KINDS = ("neox", "neox_seq", "llama")


@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory):
    paths = {}
    for kind in FAMILY_KINDS:
        paths[kind] = str(tmp_path_factory.mktemp(kind))
        tiny_model(kind).save_pretrained(paths[kind])
    return paths


def blocks():
    return [torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(i)) for i in range(64)]


class Record(L.Callback):
    """Parameters before each optimizer step, and the stage of each step."""

    def __init__(self):
        self.before, self.stages = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        self.stages.append(pl_module.stage(trainer.global_step))


@pytest.mark.parametrize("kind,mixer", [("neox", "mamba"), ("neox_seq", "retention"), ("llama", "gla")])
def test_stages_and_frozen_tensors_bit_identical_until_unfreezing(source_dirs, kind, mixer):
    opts = {"expand": 1, "d_state": 32, "dt_rank": 4} if mixer == "mamba" else {"key_dim": 32} if mixer == "gla" else {}
    module = XatlLM(source_dirs[kind], mixer=mixer, mixer_config=opts, attn_layers=[1], transfer=list(COMPONENTS),
                    unfreeze={"step": 3, "warmup_steps": 1}, align={"steps": 2},
                    distill={"lm_weight": 0, "kl_weight": 1, "hidden_weight": 1}, lr=1e-2, warmup_steps=1)
    src = dict(tiny_model(kind).named_parameters())
    frozen = module.transferred
    fam = family_of(module.model)
    assert f"{fam.tok_emb}.weight" in frozen and f"{fam.blocks}.1.{fam.attn_out}.weight" in frozen
    assert f"{fam.blocks}.0.{fam.attn}.mixer.out_proj.weight" in frozen  # W_O, copied whole
    rec = Record()
    torch.manual_seed(0)
    L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[rec]).fit(module, DataLoader(blocks(), batch_size=4))
    assert rec.stages == ["align"] * 2 + ["distill"] * 4 and module.unfrozen_at == 3
    for step in range(4):  # before steps 0..3 every transferred tensor is the source's, bit for bit
        for n in frozen:
            want = src[n] if n in src else None
            assert torch.equal(rec.before[step][n], want if want is not None else rec.before[0][n]), (step, n)
    final = dict(module.model.named_parameters())
    assert all(not torch.equal(final[n], rec.before[3][n]) for n in frozen)  # all move once unfrozen
    mixer_names = [n for n in final if ".mixer." in n and n not in frozen]
    assert mixer_names and all(not torch.equal(rec.before[1][n], rec.before[0][n]) for n in mixer_names)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_alignment_targets_are_the_source_attention_on_its_own_norm(kind):
    """The aligner feeds each mixer what the source's attention read (its input norm's output, the same norm
    in a parallel-residual block) and pulls it towards that attention's output: the first block's input
    checked against the source's embedding and norm run by hand; gradients reach the mixers only."""
    src, student = source_and_hybrid(kind, "retention")
    aligner = AttentionAligner(Teacher(src), student.mixer_layers(), "mse")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    loss, per_layer = aligner(student, ids)
    fam = family_of(src)
    block = get_module(src, fam.blocks)[0]
    with torch.no_grad():
        x = get_module(src, fam.tok_emb)(ids)
        normed = get_module(block, fam.attn_norm)(x)
        targets = aligner.targets(ids)
    torch.testing.assert_close(targets[0][0], normed)
    want = hidden_alignment([attn(student, 0).mixer(normed)[0]], [targets[0][1]], "mse")
    torch.testing.assert_close(per_layer[0], want.detach())
    loss.backward()
    for n, p in student.named_parameters():
        assert (p.grad is not None) == (".mixer." in n), n


class TrainBlocks(L.LightningDataModule):
    """What attn_layers: auto reads from a data module: split("train") and batch_size; the validation split is
    not for choosing layers."""

    def __init__(self):
        super().__init__()
        self.batch_size = 4
        self.blocks = blocks()[:16]

    def split(self, name):
        if name != "train":
            raise AssertionError(f"attn_layers: auto read the {name} split")
        return self.blocks

    def train_dataloader(self):
        return DataLoader(blocks(), batch_size=4)


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_auto_attention_layers(source_dirs, kind):
    module = XatlLM(source_dirs[kind], mixer="gla", mixer_config={"key_dim": 32}, attn_layers="auto",
                    auto_attn={"keep": 1, "steps": 3, "batches": 2, "seed": 1}, transfer=list(COMPONENTS),
                    freeze=False, lr=0.0)  # one step that changes no weight: the kept layer stays the source's
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).fit(module, datamodule=TrainBlocks())
    kept = module.model.config.attn_layers
    assert len(kept) == 1 and kept == [module.ranking[0][0]] and module.model.mixer_layers() == [1 - kept[0]]
    src = tiny_model(kind)
    fam = family_of(src)
    for (n, p), (m, q) in zip(attn(src, kept[0]).named_parameters(), attn(module.model, kept[0]).named_parameters()):
        assert n == m and torch.equal(p, q), n  # the kept layer is the source's attention, copied whole
    assert type(attn(module.model, kept[0])) is type(get_module(get_module(src, fam.blocks)[kept[0]], fam.attn))
