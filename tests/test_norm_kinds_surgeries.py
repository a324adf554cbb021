"""LN-tuning and XATL read the Qwen3, Gemma 3 and OLMo 2 family entries: LN-tuning finds every norm transformers
builds (QK-norms and post-norms included) and trains exactly those; an LN-free export is refused; XATL and
shared-depth twins refuse these families with the reason (tests/norm_family_models.py: randomized parameters)."""

import pytest

from norm_family_models import KINDS, random_tokens, tiny_ln_free, tiny_norm_family
from surgery.errors import SurgeryError
from surgery.families import family_of, is_norm, norm_paths
from surgery.ln_tune.params import ln_parameters, train_only
from surgery.share.model import shared_config_from
from surgery.xatl import hybrid_config_from
from surgery.xatl.transfer.weights import transfer_shared_weights
from xatl_models import source_and_hybrid


@pytest.mark.parametrize("kind", KINDS)
def test_ln_tuning_trains_every_norm_the_model_has_and_nothing_else(kind):
    model = tiny_norm_family(kind)
    names = set(ln_parameters(model))
    built = {n for n, m in model.named_modules() if is_norm(m)}
    assert names == {f"{n}.weight" for n in built} == {f"{p}.weight" for p in norm_paths(model)}
    assert any(".q_norm." in n for n in names) and any(".k_norm." in n for n in names)
    assert train_only(model, names) == sum(model.get_submodule(n).weight.numel() for n in built)
    ids = random_tokens()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == (n in names) for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_ln_tuning_refuses_an_ln_free_export(kind):
    with pytest.raises(SurgeryError, match="is LN-free .*nothing to LN-tune"):
        ln_parameters(tiny_ln_free(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_xatl_and_shared_depth_refuse_these_families_with_the_reason(kind):
    model = tiny_norm_family(kind)
    reason = family_of(model).twin_refusal
    assert "q_norm, k_norm" in reason
    with pytest.raises(SurgeryError, match=f"model type '{model.config.model_type}' has no hybrid: its attention normalizes"):
        hybrid_config_from(model.config, "gla")
    with pytest.raises(SurgeryError, match="has no shared-depth twin: its attention normalizes queries and keys"):
        shared_config_from(model.config, [0, 0])
    _, hybrid = source_and_hybrid("llama", "gla", [])
    with pytest.raises(SurgeryError, match=f"cannot transfer from a {family_of(model).name} model: its attention "
                                           "normalizes .* transfer from a gpt2, gpt_neox or llama model"):
        transfer_shared_weights(model, hybrid)


def test_ln_tuning_the_attention_norms_of_olmo2_is_refused_naming_its_norms():
    with pytest.raises(SurgeryError, match="olmo2 blocks have no attn_norm .*self_attn.q_norm, .*post_feedforward_layernorm"):
        ln_parameters(tiny_norm_family("olmo2"), norms="attn")
