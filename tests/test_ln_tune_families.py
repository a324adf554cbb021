"""LN-tuning on GPT-NeoX (parallel and sequential residual) and Llama-style models (RMSNorm: gains only):
only norm entries (and a task head) move, masked-out entries stay bit-identical, the closed-form Fisher equals
one backward per example for LayerNorm and RMSNorm, and the export is the source's own transformers class."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import surgery.ln_tune.fisher as fisher_module
from surgery.errors import SurgeryError
from surgery.ln_tune import EntryMask, LNTuneConfig, export, fisher_scores, ln_parameters, ln_tune, peft_ln_tuning
from surgery.ln_tune import next_token_log_likelihood, trainable_parameters
from surgery.ln_tune.methods import prepare
from remove_ln_models import FAMILY_CONFIGS, tiny_model

KINDS = ["neox", "neox_seq", "llama"]
D, N_NORMS = 32, 5  # hidden size of the tiny models; 2 layers x 2 norms + the final norm


def tiny_classifier(kind: str, seed: int = 0):
    """A tiny random sequence classifier of one family layout (head: `score`, no bias), norms perturbed."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[kind](64)
    config.num_labels, config.pad_token_id = 2, 0
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def norm_entries_by_type(model) -> set[str]:
    """Norm parameter names found by module type, independently of the family registry."""
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, LlamaRMSNorm))
            for p, _ in m.named_parameters(recurse=False)}


def train(model, mask, classify: bool, steps: int = 5, seed: int = 0):
    """AdamW with strong weight decay on every trainable entry (so a frozen-but-decayed entry would move)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (4, 16), generator=g)
    labels = torch.randint(0, 2, (4,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.5)
    for _ in range(steps):
        loss = model(ids, labels=labels).loss if classify else model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        mask.restore(model)
    return model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("classify", [False, True], ids=["lm", "classifier"])
@pytest.mark.parametrize("kind", KINDS)
def test_only_norm_entries_and_head_change(kind, classify):
    model = tiny_classifier(kind) if classify else tiny_model(kind)
    before = snapshot(model)
    mask = ln_tune(model, LNTuneConfig())
    norms = norm_entries_by_type(model)
    head = {"score.weight"} if classify else set()
    per_norm = D if kind == "llama" else 2 * D  # RMSNorm: gain only; LayerNorm: gain and bias
    assert set(ln_parameters(model)) == norms and len(norms) == N_NORMS * per_norm // D
    assert trainable_parameters(model, mask) == N_NORMS * per_norm + len(head) * 2 * D
    train(model, mask, classify)
    for n, p in model.named_parameters():
        if n in norms or n in head:
            assert (p != before[n]).all(), n  # every entry moved
        else:
            assert torch.equal(p, before[n]), n  # bit-identical, tied embeddings included


@pytest.mark.parametrize("kind", KINDS)
def test_masked_out_entries_stay_bit_identical(kind):
    model = tiny_model(kind, seed=1)
    before = snapshot(model)
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) for n, p in ln_parameters(model).items()}
    mask = ln_tune(model, LNTuneConfig(mask=EntryMask.top_k(scores, fraction=0.1)))
    n_ln = sum(m.numel() for m in mask.masks.values())
    assert mask.selected() == round(0.1 * n_ln) and trainable_parameters(model, mask) == mask.selected()
    train(model, mask, classify=False)
    params = dict(model.named_parameters())
    for n, p in params.items():
        if n in mask.masks:
            m = mask.masks[n]
            assert torch.equal(p[~m], before[n][~m]), n
            assert (p[m] != before[n][m]).all(), n
        else:
            assert torch.equal(p, before[n]), n


# float32, batched vs one example at a time: ~1e-7 relative measured; 1e-5 catches any real error (O(1)).
RTOL = 1e-5


def assert_close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        scale = b[n].abs().max()
        assert scale > 0 and (a[n] - b[n]).abs().max() <= RTOL * scale, n


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_fisher_equals_one_backward_per_example(kind, monkeypatch):
    model = tiny_model(kind, seed=2)
    x = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))
    loop = fisher_scores(model, [x[:4], x[4:]], next_token_log_likelihood, method="loop")
    monkeypatch.setattr(fisher_module, "_loop_step", None)  # the hooks method must not fall back to the loop
    hooks = fisher_scores(model, [x[:4], x[4:]], next_token_log_likelihood)
    assert_close(hooks, loop)
    assert set(hooks) == set(ln_parameters(model)) and any(n.endswith(".bias") for n in hooks) == (kind != "llama")


class OffsetRMSNorm(LlamaRMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), which the closed form (x_hat * weight) does not describe."""

    def forward(self, x):
        return super().forward(x) / self.weight * (1 + self.weight)


def test_closed_form_refuses_a_norm_it_does_not_describe():
    model = tiny_model("llama")
    odd = OffsetRMSNorm(D, eps=model.config.rms_norm_eps)
    odd.weight.data.copy_(model.model.norm.weight.data)
    model.model.norm = odd
    x = torch.randint(0, 64, (2, 8))
    with pytest.raises(SurgeryError, match="closed-form Fisher does not reproduce norm 'model.norm' \\(OffsetRMSNorm\\)"
                                           ".*method='loop'"):
        fisher_scores(model, [x], next_token_log_likelihood)
    assert fisher_scores(model, [x], next_token_log_likelihood, method="loop")["model.norm.weight"].shape == (D,)


@pytest.mark.slow
def test_export_is_the_source_class_and_plain_transformers_reloads_it(tmp_path):
    expected, x = {}, torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    for kind in ("neox", "llama"):
        model = tiny_model(kind)
        train(model, ln_tune(model, LNTuneConfig()), classify=False)
        out = export(model).eval()
        assert type(out).__name__ == {"neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}[kind]
        assert all(p.requires_grad for p in out.parameters())
        out.save_pretrained(tmp_path / kind)
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["architectures"] == [type(out).__name__] and "auto_map" not in config
        with torch.no_grad():
            expected[kind] = out(x).logits
    script = (  # a fresh interpreter that never imports surgery
        "import json, sys, torch; from transformers import AutoModelForCausalLM\n"
        f"x = torch.tensor({x.tolist()}); out = {{}}\n"
        "for kind in ('neox', 'llama'):\n"
        f"    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + kind).eval()\n"
        "    with torch.no_grad(): out[kind] = [type(m).__name__, m(x).logits.tolist()]\n"
        "assert 'surgery' not in sys.modules; print(json.dumps(out))")
    result = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    for kind, (cls, logits) in result.items():
        assert cls == type(AutoModelForCausalLM.from_pretrained(tmp_path / kind)).__name__
        assert torch.equal(torch.tensor(logits), expected[kind]), kind  # same weights, same arithmetic


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_peft_ln_tuning_agrees_and_merges_to_the_plain_class(kind):
    ours = tiny_model(kind)
    train(ours, ln_tune(ours, LNTuneConfig()), classify=False)
    theirs = peft_ln_tuning(tiny_model(kind))
    train(theirs, EntryMask({}), classify=False)
    merged = export(theirs)
    assert type(merged) is type(ours)
    a, b = dict(ours.named_parameters()), dict(merged.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


def test_lora_targets_come_from_the_family():
    r = 8
    counts = {kind: trainable_parameters(prepare(tiny_model(kind), "lora", head=None)[0]) for kind in ("neox", "llama")}
    assert counts["neox"] == 2 * r * (D + 3 * D)  # 2 layers x query_key_value (32 -> 96)
    assert counts["llama"] == 2 * r * ((D + D) + (D + D // 2))  # 2 layers x (q_proj 32 -> 32, v_proj 32 -> 2 x 8)


def test_rmsnorm_bias_requests_and_foreign_entries_are_refused():
    llama = tiny_model("llama")
    with pytest.raises(SurgeryError, match="norms without bias \\(LlamaRMSNorm: gains only\\), so biases alone"):
        ln_tune(llama, LNTuneConfig(weights=False, biases=True))
    with pytest.raises(SurgeryError, match="weights=False and biases=False select no norm parameter"):
        ln_tune(tiny_model("neox"), LNTuneConfig(weights=False, biases=False))
    with pytest.raises(SurgeryError, match="has no bias parameters \\(Llama-style models have none\\): BitFit"):
        prepare(tiny_model("llama"), "bitfit", head=None)
    with pytest.raises(SurgeryError, match="1 of them are biases of modules without one \\(e.g. an RMSNorm"):
        ln_tune(llama, LNTuneConfig(mask=EntryMask({"model.norm.bias": torch.ones(D, dtype=torch.bool)})))
    neox = tiny_model("neox")
    gains = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in ln_parameters(neox, biases=False).items()}
    with pytest.raises(SurgeryError, match="the mask names parameters LN-tuning does not train here: \\['lm_head"):
        ln_tune(neox, LNTuneConfig(mask=EntryMask({"lm_head.weight": torch.ones(64, D, dtype=torch.bool), **gains})))
    with pytest.raises(SurgeryError, match="does not train here: \\['gpt_neox.final_layer_norm.bias'\\].*biases=False"):
        ln_tune(neox, LNTuneConfig(biases=False, mask=EntryMask({**gains, "gpt_neox.final_layer_norm.bias":
                                                                  torch.ones(D, dtype=torch.bool)})))


def test_a_norm_the_family_does_not_describe_is_refused():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_norm = LlamaRMSNorm(8)  # as Qwen3 has; the llama family knows no such norm
    with pytest.raises(SurgeryError, match="has norms the llama family does not describe: "
                                           "\\['model.layers.0.self_attn.q_norm'\\].*surgery/families.py"):
        ln_tune(model)
