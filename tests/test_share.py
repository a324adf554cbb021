"""Shared depth (`surgery.share`): tying, per-layer norms, relaxation, mixture of experts, the vanilla expansion."""

from __future__ import annotations

import pytest
import torch
from remove_ln_models import tiny_model
from transformers import AutoModelForCausalLM

import surgery  # noqa: F401  (registers the shared_* model types)
from surgery.errors import SurgeryError
from surgery.families import family_of, get_module, in_out_weight
from surgery.share import ShareConfig, expand, share_depth, unique_parameters
from surgery.share.groups import block_of_layer, init_layers
from surgery.share.model import projection_paths
from surgery.share.moe import MoEMLP

KINDS = ["gpt2", "neox", "llama"]


def four_layers(kind: str, seed: int = 0):
    """A tiny random model of a family with 4 layers, every parameter perturbed."""
    return tiny_model(kind, seed, layers=4)


IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))


def layers(model):
    return get_module(model, family_of(model).blocks)


def test_groups_and_init_layers():
    assert block_of_layer("cycle:2", 4) == [0, 1, 0, 1]
    assert block_of_layer("contiguous:2", 4) == [0, 0, 1, 1]
    assert block_of_layer("contiguous:3", 6) == [0, 0, 1, 1, 2, 2]
    assert block_of_layer([0, 0, 1, 0], 4) == [0, 0, 1, 0]
    assert init_layers([0, 1, 0, 1], "average") == [[0, 2], [1, 3]]
    assert init_layers([0, 1, 0, 1], "first") == [[0], [1]]
    assert init_layers([0, 1, 2, 0, 1, 2], "stepwise") == [[0], [2], [4]]  # every (L/K)-th layer, Bae et al.


@pytest.mark.parametrize("groups, message", [
    ("pairs", "write 'cycle:K', 'contiguous:K' or a list"), ("cycle:5", "K must be between 1 and the model's 4 layers"),
    ([0, 1], "lists 2 block ids for a 4-layer model"), ([0, 2, 0, 2], "block ids must be 0..K-1"),
])
def test_bad_groups_name_the_fix(groups, message):
    with pytest.raises(SurgeryError, match=message):
        block_of_layer(groups, 4)


@pytest.mark.parametrize("fields, message", [
    ({"norms": "per-layer"}, "choose individual"), ({"relax_rank": -1}, "a rank >= 0"), ({"init": "lower"}, "average, first, stepwise"),
    ({"moe_experts": 2, "moe_top_k": 3}, "1 <= top_k <= experts"), ({"moe_experts": 2, "relax_rank": 4}, "set one of them to 0"),
])
def test_bad_share_config_names_the_fix(fields, message):
    with pytest.raises(SurgeryError, match=message):
        ShareConfig(**fields)


@pytest.mark.parametrize("kind", KINDS)
def test_tied_parameters_are_one_tensor_a_step_changes_every_use(kind):
    model = share_depth(four_layers(kind), ShareConfig(groups="cycle:2"))
    fam, blocks = family_of(model), layers(model)
    path = projection_paths(fam, moe=False)[0]
    a, b = get_module(blocks[0], path), get_module(blocks[2], path)
    assert a.base is b.base and get_module(blocks[1], path).base is not a.base
    names = [n for n, p in model.named_parameters() if p is a.base.weight]
    assert len(names) == 1 and names[0].startswith(f"{fam.blocks}.0.")  # stored once, under its owner's name
    before = in_out_weight(b.base).clone()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    after_a, after_b = a.effective()[0], b.effective()[0]
    assert not torch.equal(after_b, before) and torch.equal(after_a, after_b)


@pytest.mark.parametrize("kind", KINDS)
def test_individual_norms_are_each_layers_own_copy_of_the_original(kind):
    original = four_layers(kind)
    model = share_depth(original, ShareConfig(groups="cycle:1", norms="individual"))
    fam = family_of(original)
    seen = set()
    for src, dst in zip(layers(original), layers(model)):
        for path in (fam.attn_norm, fam.mlp_norm):
            for name, p in get_module(dst, path).named_parameters():
                assert torch.equal(p, get_module(src, path).get_parameter(name)) and id(p) not in seen
                seen.add(id(p))


def test_shared_norms_are_one_module_made_by_init():
    original = four_layers("gpt2")
    model = share_depth(original, ShareConfig(groups="cycle:2", norms="shared", init="average"))
    blocks, src = layers(model), layers(original)
    assert blocks[2].ln_1.target is blocks[0].ln_1
    assert torch.allclose(blocks[0].ln_1.weight, (src[0].ln_1.weight + src[2].ln_1.weight) / 2)
    assert unique_parameters(model) < unique_parameters(share_depth(original, ShareConfig(groups="cycle:2")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", ["average", "stepwise"])
def test_full_rank_relaxation_starts_as_the_original(kind, init):
    original = four_layers(kind)
    model = share_depth(original, ShareConfig(groups="cycle:1", init=init, relax_rank="full")).eval()
    ref = original(IDS).logits
    # float32 weights rebuilt from a float64 SVD: ~1e-6 relative per weight, ~1e-5 on logits of order 1-10
    torch.testing.assert_close(model(IDS).logits, ref, atol=5e-5, rtol=1e-5)
    plain = share_depth(original, ShareConfig(groups="cycle:1", init=init)).eval()
    assert (plain(IDS).logits - ref).abs().max() > 1e-2  # without relaxation the layers differ


def test_low_rank_relaxation_is_the_truncated_svd_of_the_difference():
    original = four_layers("llama")
    model = share_depth(original, ShareConfig(groups="cycle:2", relax_rank=3))
    proj = get_module(layers(model)[2], "self_attn.q_proj")
    diff = in_out_weight(get_module(layers(original)[2], "self_attn.q_proj")).double() - in_out_weight(proj.base).double()
    u, s, vh = torch.linalg.svd(diff)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close((proj.lora_a @ proj.lora_b).double(), best, atol=1e-5, rtol=1e-4)
    assert proj.lora_a.shape == (32, 3) and proj.bias_delta is None  # Llama's projections have no bias


@pytest.mark.parametrize("kind", KINDS)
def test_vanilla_expansion_computes_what_the_shared_model_does(kind):
    model = share_depth(four_layers(kind), ShareConfig(groups="contiguous:2", norms="shared", relax_rank=2))
    with torch.no_grad():  # deltas away from their SVD start, as after training
        for name, p in model.named_parameters():
            if "lora_" in name or "bias_delta" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    vanilla = expand(model)
    assert type(vanilla).__name__ == family_of(vanilla).hf_architecture
    torch.testing.assert_close(vanilla(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_moe_sends_each_token_to_k_experts_that_start_as_the_original_mlps():
    original = four_layers("llama")
    model = share_depth(original, ShareConfig(groups="cycle:2", moe_experts=2, moe_top_k=2)).train()
    moe = layers(model)[0].mlp
    assert isinstance(moe, MoEMLP) and layers(model)[2].mlp.target is moe
    for e, layer in enumerate((0, 2)):  # block 0's group: layers 0 and 2
        for (name, p), q in zip(moe.experts[e].named_parameters(), layers(original)[layer].mlp.parameters()):
            assert torch.equal(p, q), name
    model(IDS)
    routing = moe.last_routing
    assert routing.shape == (IDS.numel(), 2) and all(len(set(r.tolist())) == 2 for r in routing)
    losses = model.pop_aux_losses()
    assert len(losses) == 4 and all(l >= 1 - 1e-6 for l in losses)  # 4 uses of 2 MoEs; >= 1, 1 when balanced
    assert model.pop_aux_losses() == []
    with pytest.raises(SurgeryError, match="no vanilla form"):
        expand(model)


def test_moe_top1_output_is_the_chosen_experts_output():
    torch.manual_seed(0)
    experts = [torch.nn.Linear(8, 8) for _ in range(3)]
    moe = MoEMLP(experts, 8, top_k=1).eval()
    x = torch.randn(2, 5, 8)
    out, chosen = moe(x), moe.last_routing[:, 0]
    expected = torch.stack([experts[int(e)](v) for v, e in zip(x.reshape(-1, 8), chosen)]).reshape(x.shape)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_stores_shared_weights_once_and_reloads_through_auto(kind, tmp_path):
    from safetensors import safe_open

    model = share_depth(four_layers(kind), ShareConfig(groups="cycle:2", relax_rank=2)).eval()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    fam = family_of(model)
    base = projection_paths(fam, moe=False)[0]
    stored = [k for k in keys if f".{base}.base." in k]
    assert sorted({k.split(".")[len(fam.blocks.split("."))] for k in stored}) == ["0", "1"]  # owners only
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.share_blocks == [0, 1, 0, 1]
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)


def test_a_hybrid_or_shared_model_is_refused_with_the_reason():
    model = share_depth(four_layers("gpt2"))
    with pytest.raises(SurgeryError, match="needs a model of a transformers family"):
        share_depth(model)
