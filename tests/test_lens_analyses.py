"""The LN-removal papers' analyses of `surgery verify` (`surgery.lens.analyses`) against independent references.

- entropy and ECE against hand arithmetic on known probabilities (float64 logits: equal to 1e-12), and against a
  plain-Python loop on random distributions;
- first-position norms against `output_hidden_states` (the last hidden state is after the final norm, so the
  final layer is read from a copy whose final norm is an identity);
- per-head attention sinks against the HF model's eager attention weights;
- entropy neurons: a neuron planted in an exact null direction of the effective unembedding with a large norm is
  selected, a larger one in its row space is not; mean-ablating it moves the entropy through the final LayerNorm's
  scale, equals folding its mean into the output bias, and does nothing to an LN-free model's outputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lens_models import make_ln_free, tiny_gpt2

from surgery.families import family_of, get_module, set_module
from surgery.lens import load_hooked
from surgery.lens.checks import attention_sink_heads
from surgery.lens.analyses import (
    entropy_neurons,
    first_position_norms,
    null_space_scores,
    output_stats,
    select_entropy_neurons,
)
from remove_ln_models import tiny_model


def test_entropy_and_ece_by_hand():
    p = torch.tensor([[0.55, 0.25, 0.15, 0.05],   # top-1 0.55, bin 5, target 0: right
                      [0.58, 0.22, 0.10, 0.10],   # top-1 0.58, bin 5, target 1: wrong
                      [0.92, 0.04, 0.02, 0.02],   # top-1 0.92, bin 9, target 0: right
                      [0.10, 0.35, 0.30, 0.25]], dtype=torch.float64)  # top-1 0.35, bin 3, target 2: wrong
    targets = torch.tensor([0, 1, 0, 2])
    shift = torch.randn(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5  # softmax ignores it
    result = output_stats((p.log() + shift).view(2, 2, 4), targets.view(2, 2))
    ece = (2 / 4) * abs(0.5 - (0.55 + 0.58) / 2) + (1 / 4) * abs(1 - 0.92) + (1 / 4) * abs(0 - 0.35)  # = 0.14
    entropy = sum(-sum(x * math.log(x) for x in row) for row in p.tolist()) / 4
    loss = -(math.log(0.55) + math.log(0.22) + math.log(0.92) + math.log(0.30)) / 4
    assert result["ece"] == pytest.approx(ece, abs=1e-12) and ece == pytest.approx(0.14)
    assert result["entropy"] == pytest.approx(entropy, abs=1e-12)
    assert result["loss"] == pytest.approx(loss, abs=1e-12)
    assert result["accuracy"] == 0.5 and result["confidence"] == pytest.approx((0.55 + 0.58 + 0.92 + 0.35) / 4, abs=1e-12)
    assert result["bins"]["count"] == [0, 0, 0, 1, 0, 2, 0, 0, 0, 1]


def test_ece_against_a_loop_on_random_distributions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 7, dtype=torch.float64, generator=gen) * torch.rand(300, 1, dtype=torch.float64, generator=gen) * 6
    targets = torch.randint(0, 7, (300,), generator=gen)
    bins = {}
    for row, t in zip(logits.softmax(-1).tolist(), targets.tolist()):
        conf = max(row)
        b = min(int(conf * 10), 9)
        n, c, a = bins.get(b, (0, 0.0, 0.0))
        bins[b] = (n + 1, c + conf, a + (row.index(conf) == t))
    ece = sum(n / 300 * abs(a / n - c / n) for n, c, a in bins.values())
    assert len(bins) >= 5 and output_stats(logits, targets)["ece"] == pytest.approx(ece, abs=1e-12)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_first_position_norms_against_hidden_states(kind):
    model = tiny_gpt2(seed=3) if kind == "gpt2" else tiny_model(kind, seed=3)
    tokens = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(3))
    got = first_position_norms(model, tokens)
    bare = copy.deepcopy(model)
    set_module(bare, family_of(bare).final_norm, torch.nn.Identity())
    with torch.no_grad():
        hidden = bare(tokens, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    n_layers = len(hidden) - 1
    assert len(got["ratio"]) == n_layers >= 2
    for layer in range(n_layers):
        norms = hidden[layer + 1].norm(dim=-1)
        first, others = norms[:, 0].mean().item(), norms[:, 1:].mean().item()
        assert got["first"][layer] == pytest.approx(first, rel=1e-5)
        assert got["ratio"][layer] == pytest.approx(first / others, rel=1e-5)
    assert max(abs(r - 1) for r in got["ratio"]) > 1e-3  # position 0 does differ in a random model


def test_attention_sink_heads_match_hf_attentions():
    hf = tiny_gpt2(seed=4)
    hf.config._attn_implementation = "eager"
    tokens = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        attns = hf(tokens, output_attentions=True).attentions  # per layer (batch, head, query, key)
    ref = torch.stack([a[:, :, 1:, 0].double().mean((0, 2)) for a in attns])
    assert torch.allclose(attention_sink_heads(load_hooked(hf), tokens), ref, atol=1e-6)


@torch.no_grad()
def planted_model(seed: int = 5):
    """(model, null neuron, row-space neuron): a random tiny GPT-2 whose final-MLP neuron `null` writes, with a large
    norm, along a centered direction n that the unembedding cannot see (W_U (w_f * n) = 0 exactly), and whose
    neuron `row`, with a larger norm still, writes along the unembedding's top singular direction."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_gpt2(seed=seed)
    mlp, w_f = model.transformer.h[-1].mlp, model.transformer.ln_f.weight
    n = torch.randn(32, generator=gen)
    n = (n - n.mean()) / (n - n.mean()).norm()
    m = w_f * n
    model.lm_head.weight -= torch.outer(model.lm_head.weight @ m, m) / m.dot(m)  # tied: the embedding changes too
    w_eff = model.lm_head.weight * w_f
    w_eff = w_eff - w_eff.mean(0)
    top = torch.linalg.svd(w_eff - w_eff.mean(1, keepdim=True))[2][0]  # centered in d_model, in the row space
    null, row = torch.randperm(mlp.c_proj.weight.shape[0], generator=gen)[:2].tolist()
    typical = mlp.c_proj.weight.norm(dim=1).median()
    mlp.c_proj.weight[null] = 60 * typical * n
    mlp.c_proj.weight[row] = 80 * typical * top
    mlp.c_fc.weight[:, null] *= 30  # an activation that varies from token to token
    return model, null, row


def test_entropy_neuron_selection_picks_the_planted_neuron():
    model, null, row = planted_model()
    norm, fraction, chance = null_space_scores(model)
    assert chance == pytest.approx(2 / 31)  # k = round(0.05 * 31) of the 31 centered dimensions
    assert fraction[null] > 0.999 and fraction[row] < 1e-6
    assert norm[row] > norm[null] > 10 * norm.median()
    assert select_entropy_neurons(norm, fraction, chance) == [null]


def _blocks(n=6, length=32, seed=6):
    return list(torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed)))


@torch.no_grad()
def test_mean_ablation_moves_entropy_through_the_final_norm_only():
    model, null, _ = planted_model()
    blocks = _blocks()
    clean, report = entropy_neurons(model, blocks, batch_size=4)
    assert report["neurons"] == [null] and abs(report["delta_entropy"]) > 0.05

    # The same ablation by weights: the neuron's output row zeroed, its mean contribution added to the bias.
    acts = []
    handle = model.transformer.h[-1].mlp.act.register_forward_hook(lambda m, a, out: acts.append(out[..., null].flatten()))
    for b in blocks:
        model(b[None])
    handle.remove()
    folded = copy.deepcopy(model)
    c_proj = folded.transformer.h[-1].mlp.c_proj
    c_proj.bias += torch.cat(acts).double().mean().float() * c_proj.weight[null]
    c_proj.weight[null] = 0
    ablated = output_stats(torch.cat([folded(b[None]).logits[0, :-1] for b in blocks]), torch.cat([b[1:] for b in blocks]))
    assert clean["tokens"] == ablated["tokens"] == 6 * 31
    assert clean["entropy"] + report["delta_entropy"] == pytest.approx(ablated["entropy"], abs=1e-4)
    assert clean["loss"] + report["delta_loss"] == pytest.approx(ablated["loss"], abs=1e-4)

    free = make_ln_free(copy.deepcopy(model))  # same unembedding and final-norm direction: the neuron is still selected
    _, free_report = entropy_neurons(free, blocks, batch_size=4)
    assert free_report["neurons"] == [null]
    assert abs(free_report["delta_entropy"]) < 1e-4 and abs(free_report["delta_loss"]) < 1e-4
    assert get_module(free, "transformer.ln_f").eps == 1e12
