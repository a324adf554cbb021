"""LayerNorm's roles in attention (Brody et al. 2023, `surgery.lens.expressivity`): the convex-hull LP on planted
keys, the all-ones component of a LayerNorm-ed and a raw input, the relative entropy of uniform and one-hot
attention, the keys read from the cache (after the rotary embedding), and the three rows in `surgery verify`'s
report for an LN-free GPT-2, Pythia (GPT-NeoX) and Llama against their originals.

Tolerances: HiGHS decides feasibility to 1e-7 on keys scaled to norm <= 1, and the planted points sit 1e-2 or more
from any hull boundary. A float32 LayerNorm of an input with mean 50 and std 1 leaves a mean of order
50 * 2^-24 ~ 3e-6 per channel (measured 1e-8 .. 1e-7 on average); we allow 1e-5.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from remove_ln_models import tiny_model
from surgery.lens.expressivity import (
    all_ones_component,
    attention_keys,
    in_convex_hull,
    relative_attention_entropy,
    unselectable_keys,
)


def _circle(n: int, radius: float = 1.0, center=(0.0, 0.0)) -> torch.Tensor:
    angle = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    return torch.stack([radius * angle.cos() + center[0], radius * angle.sin() + center[1]], dim=1)


def test_centroid_of_a_circle_is_unselectable_and_the_circle_points_are_not():
    circle = _circle(8, center=(3.0, -2.0))
    keys = torch.cat([circle, circle.mean(0, keepdim=True)])  # the centroid is the last key
    inside, undecided = unselectable_keys(keys)
    assert undecided == 0
    assert inside.tolist() == [False] * 8 + [True]


def test_point_outside_the_hull_is_selectable_and_a_point_inside_it_is_not():
    circle = _circle(6)  # a hexagon: its edges lie at distance cos(30 deg) = 0.866 from the center
    outside = 0.9 * torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]], dtype=torch.float64)  # past an edge
    inner = torch.tensor([[0.2, -0.4]], dtype=torch.float64)
    inside, _ = unselectable_keys(torch.cat([circle, outside, inner]))
    assert inside.tolist() == [False] * 6 + [False, True]  # the outside point covers no vertex (it lies close to the edge)
    assert in_convex_hull(np.array([0.2, -0.4]), circle.numpy()) is True
    assert in_convex_hull(outside[0].numpy(), circle.numpy()) is False
    assert in_convex_hull(np.array([0.0, 0.0]), np.zeros((0, 2))) is False


def test_keys_on_a_sphere_are_all_selectable_and_their_mixtures_are_not():
    """(b) of the paper: points of equal norm are extreme points; convex mixtures of them lie inside the hull."""
    gen = torch.Generator().manual_seed(0)
    sphere = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    sphere = 5.0 * sphere / sphere.norm(dim=1, keepdim=True)  # 40 keys > d + 1 = 7: the hull test is not vacuous
    weights = torch.rand(10, 40, generator=gen, dtype=torch.float64)
    mixtures = (weights / weights.sum(1, keepdim=True)) @ sphere
    inside, undecided = unselectable_keys(torch.cat([sphere, mixtures]))
    assert undecided == 0 and inside.tolist() == [False] * 40 + [True] * 10


def test_a_repeated_key_is_unselectable():
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert unselectable_keys(keys)[0].tolist() == [False, True, False, True]  # k_1 = k_3: no strictly highest score


def test_layernormed_input_has_no_all_ones_component_and_a_raw_offset_input_a_large_one():
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0)) + 50.0
    normed = nn.LayerNorm(64, elementwise_affine=False)(x)
    assert all_ones_component(normed).max().item() < 1e-5
    assert all_ones_component(x).min().item() > 0.99  # 50 / sqrt(50^2 + 1)
    rms = nn.RMSNorm(64, elementwise_affine=False)(x)  # scaling alone keeps the direction
    assert torch.allclose(all_ones_component(rms), all_ones_component(x), atol=1e-6)
    assert all_ones_component(torch.ones(3)).item() == pytest.approx(1.0)
    assert all_ones_component(torch.zeros(3)).item() == 0.0


def test_entropy_of_uniform_attention_is_one_and_of_one_hot_attention_zero():
    n = 12
    causal = torch.tril(torch.ones(n, n))
    uniform = causal / causal.sum(-1, keepdim=True)
    one_hot = torch.zeros(2, 3, n, n)
    one_hot[..., 0] = 1.0  # every query on position 0
    assert relative_attention_entropy(uniform).shape == (n - 1,)
    assert torch.allclose(relative_attention_entropy(uniform), torch.ones(n - 1, dtype=torch.float64), atol=1e-6)
    assert relative_attention_entropy(one_hot).abs().max().item() == 0.0
    half = torch.zeros(n, n)
    half[:, 0] = half[torch.arange(n), torch.arange(n)] = 0.5
    assert relative_attention_entropy(half)[0].item() == pytest.approx(1.0)  # query 1: uniform over its 2 keys
    assert relative_attention_entropy(half)[-1].item() == pytest.approx(math.log(2) / math.log(n))


def _projected_keys(model, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """Layer 0's keys straight from the key projection, before any rotation: (batch, kv_heads, pos, d_head)."""
    captured = {}
    proj = model.get_submodule({"gpt2": "transformer.h.0.attn.c_attn", "neox": "gpt_neox.layers.0.attention.query_key_value",
                                "llama": "model.layers.0.self_attn.k_proj"}[kind])
    handle = proj.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    out, (b, t) = captured["out"], tokens.shape
    if kind == "gpt2":  # [q | k | v], heads of d_head inside each
        d = model.config.hidden_size
        return out[..., d : 2 * d].view(b, t, model.config.num_attention_heads, -1).transpose(1, 2)
    if kind == "neox":  # per head [q, k, v]
        heads = model.config.num_attention_heads
        d_head = model.config.hidden_size // heads
        return out.view(b, t, heads, 3 * d_head)[..., d_head : 2 * d_head].transpose(1, 2)
    return out.view(b, t, model.config.num_key_value_heads, -1).transpose(1, 2)


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_keys_are_read_after_the_rotary_embedding(kind):
    model = tiny_model(kind)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    keys, projected = attention_keys(model, tokens)[0], _projected_keys(model, kind, tokens)
    assert keys.shape == projected.shape
    assert torch.allclose(keys[:, :, 0], projected[:, :, 0], atol=1e-6)  # position 0: rotation by angle 0
    assert torch.allclose(keys.norm(dim=-1), projected.norm(dim=-1), atol=1e-5)  # a rotation keeps each norm
    rotated = not torch.allclose(keys[:, :, 1:], projected[:, :, 1:], atol=1e-4)
    assert rotated == (kind != "gpt2")  # GPT-2 has learned positions: its keys are the projection itself


# --- surgery verify on each family --------------------------------------------------------------------------------

VOCAB = 280
ARGS = ["--block-size", "64", "--seg-len", "16", "--prompts", "4", "--val-blocks", "6", "--dla-blocks", "2"]
ROWS = ["unselectable key share", "all-ones component, block input", "all-ones component, attention input",
        "attention entropy / uniform"]
PLOTS = ["unselectable_keys.png", "all_ones_component.png", "attention_entropy.png"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lens_models import write_text_corpus

    from surgery.data.corpus import Corpus
    from surgery.data.tokenizer import train_bpe

    path = write_text_corpus(tmp_path_factory.mktemp("expressivity") / "corpus.jsonl", n_docs=120)
    return path, train_bpe(Corpus(path), VOCAB)


@torch.no_grad()
def _exported(kind: str):
    """Our LN-free export of the tiny model of `kind`: norms measured on training forwards, made fake, exported."""
    from surgery.remove_ln.export import export_ln_free
    from surgery.remove_ln.points import prepare_for_removal, token_context

    model = tiny_model(kind, vocab=VOCAB)
    points = prepare_for_removal(model)
    model.train()
    for _ in range(3):
        token_context(points).eot_mask = None
        model(torch.randint(0, VOCAB, (4, 24)))
        token_context(points).flush()
    model.eval()
    for ln in points.values():
        ln.go_fake()
    return export_ln_free(model)


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("neox", marks=pytest.mark.slow), pytest.param("llama", marks=pytest.mark.slow)])
def test_verify_reports_the_three_rows_for_model_and_baseline(kind, corpus, tmp_path, monkeypatch, capsys):
    from surgery.cli.entry import main

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    data, tokenizer = corpus
    dirs = {}
    for name, model in (("free", _exported(kind)), ("base", tiny_model(kind, vocab=VOCAB))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    out = tmp_path / "out"
    assert main(["verify", dirs["free"], "--baseline", dirs["base"], "--out", str(out), "--data", data, *ARGS]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    free, base = report["results"]["model (LN-free)"], report["results"]["baseline (with LN)"]
    n_layers = 2
    for r in (free, base):
        e = r["expressivity"]
        keys = e["unselectable_keys"]
        assert len(keys["per_layer"]) == n_layers and all(0.0 <= s <= 1.0 for s in keys["per_layer"])
        assert keys["sequences"] == 2 and keys["keys_per_sequence"] == 64 > keys["d_head"] + 1
        assert torch.tensor(keys["per_head"]).mean(1).tolist() == pytest.approx(keys["per_layer"])
        ones = e["all_ones_component"]
        assert len(ones["block_input"]) == len(ones["attention_input"]) == n_layers
        assert all(0.0 < c <= 1.0 for c in ones["block_input"])
        if kind == "llama":  # an RMSNorm only scales: the direction, and so the component, is kept
            assert ones["attention_input"] == pytest.approx(ones["block_input"], rel=1e-5)
        else:  # a LayerNorm centers, and an LN-free export keeps the centering: 0 to float precision
            assert max(ones["attention_input"]) < 1e-5
        entropy = e["attention_entropy"]
        assert len(entropy["per_layer"]) == n_layers and all(0.0 <= h <= 1.0 + 1e-9 for h in entropy["per_layer"])
    md = (out / "report.md").read_text()
    for row in ROWS:
        for layer in range(n_layers):
            assert f"{row} L{layer}" in printed
            cells = next(line for line in md.splitlines() if line.startswith(f"| {row} L{layer} |")).strip("| ").split(" | ")[1:]
            assert len(cells) == 2 and all(math.isfinite(float(c)) for c in cells), row
    assert "scipy.optimize.linprog" in md and "sum_i lambda_i k_i = k_j" in md and "hook_pattern" in md
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000


def test_the_query_certificate_agrees_with_the_linear_program_on_every_key():
    """Keys proven selectable by a winning query skip the LP; on random keys plus convex mixtures of them (inside by
    construction) the verdicts equal the LP's for every key."""
    import numpy as np

    from surgery.lens.expressivity import in_convex_hull, unselectable_keys

    g = torch.Generator().manual_seed(3)
    corners = torch.randn(40, 8, generator=g, dtype=torch.float64)
    weights = torch.rand(10, 40, generator=g, dtype=torch.float64)
    keys = torch.cat([corners, (weights / weights.sum(1, keepdim=True)) @ corners])
    inside, undecided = unselectable_keys(keys)
    k = keys.numpy() - keys.numpy().mean(0)
    k = k / np.linalg.norm(k, axis=1).max()
    by_lp = [bool(in_convex_hull(k[j], np.delete(k, j, axis=0))) for j in range(len(k))]
    assert inside.tolist() == by_lp and undecided == 0
    assert inside[40:].all() and 0 < inside.sum() < len(keys)
