"""LN-tuning changes only the intended entries (bit-identical elsewhere, weight decay included);
masks round-trip through safetensors and reproduce training; PEFT's LN-tuning and ours agree; exports are plain."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from surgery.errors import SurgeryError
from surgery.ln_tune import EntryMask, LNTuneConfig, export, ln_parameters, ln_tune, peft_ln_tuning, trainable_parameters
from surgery.ln_tune.methods import prepare
from ln_tune_models import padded_batch, tiny_bert, tiny_gpt2, tiny_gpt2_classifier


def train(model, mask=None, steps=5, lr=0.05, weight_decay=0.5, seed=0):
    """AdamW with strong weight decay on every trainable entry, on a fixed padded batch."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    batch = padded_batch(seed, vocab=50)
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mask is not None:
            mask.restore(model)
    return model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ln_tuning_changes_only_norms_and_head():
    model = tiny_bert()
    before = snapshot(model)
    mask = ln_tune(model, LNTuneConfig())
    ln, head = set(ln_parameters(model)), {"classifier.weight", "classifier.bias"}
    assert trainable_parameters(model, mask) == 5 * 2 * 32 + 32 * 2 + 2
    train(model, mask)
    for n, p in model.named_parameters():
        if n in ln or n in head:
            assert (p != before[n]).all(), n  # every entry moved (weight decay alone would move it)
        else:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2_classifier])
def test_masked_training_moves_only_masked_entries_despite_weight_decay(make):
    model = make()
    before = snapshot(model)
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) for n, p in ln_parameters(model).items()}
    mask = ln_tune(model, LNTuneConfig(mask=EntryMask.top_k(scores, fraction=0.1)))
    assert mask.selected() == 32 and trainable_parameters(model, mask) == 32 + 32 * 2 + 2 * (make is tiny_bert)
    train(model, mask)
    params = dict(model.named_parameters())
    for n, m in mask.masks.items():
        assert torch.equal(params[n][~m], before[n][~m]), n  # bit-identical outside the mask
        assert (params[n][m] != before[n][m]).all(), n
    for n in set(params) - set(mask.masks):
        assert torch.equal(params[n], before[n]) == (not params[n].requires_grad), n


def test_without_restore_weight_decay_would_move_unmasked_entries():
    """Why `restore` exists: gradient masking alone leaves AdamW's decoupled decay acting on every entry."""
    model = tiny_bert()
    name = "bert.embeddings.LayerNorm.weight"
    before = model.get_parameter(name).detach().clone()
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in ln_parameters(model).items()}
    masks[name][:4] = True
    ln_tune(model, LNTuneConfig(mask=EntryMask(masks)))
    train(model, mask=None, steps=1)
    assert not torch.equal(model.get_parameter(name)[4:], before[4:])


def test_saved_mask_reproduces_training_and_transfers_to_another_task(tmp_path):
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) for n, p in ln_parameters(tiny_bert()).items()}
    mask = EntryMask.top_k(scores, fraction=0.2)
    mask.metadata["task"] = "task-a"
    mask.save(tmp_path / "masks.safetensors")
    loaded = EntryMask.load(tmp_path / "masks.safetensors")
    assert loaded.metadata == {"selection": "fisher-top-k", "task": "task-a"} and loaded.selected() == 64
    assert all(torch.equal(mask.masks[n], loaded.masks[n]) for n in mask.masks)
    # "another task": a different head initialisation and different labels than the scores came from
    runs = []
    for m in (mask, str(tmp_path / "masks.safetensors")):
        model = tiny_bert(seed=7)
        runs.append(train(model, ln_tune(model, LNTuneConfig(mask=m)), seed=7))
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert torch.equal(p, q), n


def test_mask_load_errors(tmp_path):
    with pytest.raises(SurgeryError, match="does not exist"):
        EntryMask.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SurgeryError, match="is not an LN-tuning mask"):
        EntryMask.load(tmp_path / "other.safetensors")
    with pytest.raises(SurgeryError, match="names parameters this model does not have: \\['nope.weight'\\]"):
        EntryMask({"nope.weight": torch.ones(3, dtype=torch.bool)}).apply(tiny_bert())
    with pytest.raises(SurgeryError, match="has shape \\(3,\\), the parameter \\(32,\\)"):
        EntryMask({"bert.embeddings.LayerNorm.weight": torch.ones(3, dtype=torch.bool)}).apply(tiny_bert())


def test_models_without_layernorm_are_refused():
    ln_free = tiny_gpt2()
    for ln in (m for m in ln_free.modules() if isinstance(m, torch.nn.LayerNorm)):
        ln.eps = 1e12  # neutralised: the per-token scale is sqrt(1e12) for every token (detected, no config key)
    with pytest.raises(SurgeryError, match="is LN-free \\(every norm's per-token scale is fixed.*nothing to LN-tune"):
        ln_tune(ln_free)
    claimed = tiny_gpt2()
    claimed.config.surgery_ln_free = {"scale": 1e6}  # the key over LayerNorms that still normalize
    with pytest.raises(SurgeryError, match="config.surgery_ln_free says .* but its norms still normalize per token"):
        ln_tune(claimed)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(SurgeryError, match="'Sequential' has no LayerNorm"):
        ln_tune(plain)


def test_export_is_a_plain_model_with_identical_outputs(tmp_path):
    model = tiny_bert()
    mask = ln_tune(model, LNTuneConfig())
    train(model, mask)
    model = export(model).eval()
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    batch = padded_batch(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_peft_ln_tuning_trains_the_same_entries_to_the_same_values():
    ours = tiny_bert()
    train(ours, ln_tune(ours, LNTuneConfig()))
    theirs = peft_ln_tuning(tiny_bert())
    train(theirs)
    merged = export(theirs)
    a, b = dict(ours.named_parameters()), dict(merged.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        # same arithmetic, parameter order in AdamW aside: equal to float32 rounding
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


def test_prepare_counts_trainable_entries_per_method():
    n_ln, n_head = 5 * 2 * 32, 32 * 2 + 2
    n_bias = sum(p.numel() for n, p in tiny_bert().named_parameters() if n.endswith("bias"))
    counts = {}
    for method in ("full", "head", "bitfit", "ln", "ln-random", "lora"):
        model, mask = prepare(tiny_bert(), method, fraction=0.1)
        counts[method] = trainable_parameters(model, mask)
    assert counts["full"] == sum(p.numel() for p in tiny_bert().parameters())
    assert counts["head"] == n_head and counts["bitfit"] == n_bias + 32 * 2  # n_bias has the head's bias
    assert counts["ln"] == n_ln + n_head and counts["ln-random"] == 32 + n_head
    assert counts["lora"] == 2 * 2 * 8 * (32 + 32) + n_head  # 2 layers x (query, value) x r(32 in + 32 out)
    with pytest.raises(SurgeryError, match="unknown fine-tuning method 'prefx'"):
        prepare(tiny_bert(), "prefx")
    with pytest.raises(SurgeryError, match="'ln-fisher' needs Fisher scores"):
        prepare(tiny_bert(), "ln-fisher")
