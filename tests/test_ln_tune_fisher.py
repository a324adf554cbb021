"""The empirical Fisher of LN entries equals a direct per-example computation; top-k masks select exactly k."""

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.ln_tune import EntryMask, fisher_scores, label_log_likelihood, ln_parameters, next_token_log_likelihood
from ln_tune_models import padded_batch, tiny_bert, tiny_gpt2


def direct_fisher(model, examples, log_likelihood):
    """(1/N) sum_i (d log p_i / d theta)^2, one unbatched example at a time, float64 accumulation."""
    params = ln_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for ex in examples:
        grads = torch.autograd.grad(log_likelihood(model, ex).sum(), list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g.double() ** 2
    return {n: t / len(examples) for n, t in total.items()}


def assert_close(a, b, rtol):
    assert a.keys() == b.keys()
    for n in a:
        scale = b[n].abs().max()
        assert scale > 0, n
        assert (a[n] - b[n]).abs().max() <= rtol * scale, (n, (a[n] - b[n]).abs().max() / scale)


# float32 forward/backward, summed in a different order (batched vs one example): agreement to ~1e-7
# relative was measured; 1e-5 leaves room for other BLAS builds while catching any real error (O(1)).
RTOL = 1e-5


def test_causal_lm_fisher_matches_per_example_gradients():
    model = tiny_gpt2()
    x = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))
    got = fisher_scores(model, [x[:4], x[4:]], next_token_log_likelihood)
    want = direct_fisher(model, [x[i : i + 1] for i in range(6)], next_token_log_likelihood)
    assert_close(got, want, RTOL)
    assert len(got) == 10 and sum(t.numel() for t in got.values()) == 5 * 2 * 32  # 5 norms x (gain, bias) x 32


def test_classifier_fisher_with_padding_matches_unpadded_examples():
    model = tiny_bert()
    batch = padded_batch()
    got = fisher_scores(model, [batch], label_log_likelihood)
    examples = []
    for i in range(5):
        keep = int(batch["attention_mask"][i].sum())
        examples.append({k: (v[i : i + 1, :keep] if v.ndim == 2 else v[i : i + 1]) for k, v in batch.items()})
    want = direct_fisher(tiny_bert(), examples, label_log_likelihood)
    assert_close(got, want, RTOL)


def test_fisher_max_examples_and_loop_method_agree():
    model = tiny_gpt2()
    x = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(2))
    hooks = fisher_scores(model, [x], next_token_log_likelihood, max_examples=3)
    loop = fisher_scores(model, [x[:3]], next_token_log_likelihood, method="loop")
    assert_close(hooks, loop, RTOL)


def test_fisher_leaves_flags_and_mode_alone():
    model = tiny_gpt2()
    model.train()
    model.transformer.wte.weight.requires_grad_(False)
    fisher_scores(model, [torch.zeros(2, 8, dtype=torch.long)], next_token_log_likelihood)
    assert model.training and not model.transformer.wte.weight.requires_grad and model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.requires_grad


def test_top_k_selects_the_largest_entries_globally():
    scores = {"a": torch.tensor([0.5, 3.0, 1.0]), "b": torch.tensor([[2.0, 0.1], [4.0, 1.0]])}
    mask = EntryMask.top_k(scores, count=3)
    assert mask.masks["a"].tolist() == [False, True, False]
    assert mask.masks["b"].tolist() == [[True, False], [True, False]]
    # ties go to the earlier entry; a fraction rounds to the nearest count
    tied = EntryMask.top_k({"a": torch.ones(4), "b": torch.ones(6)}, fraction=0.3)
    assert tied.selected() == 3 and tied.masks["a"].tolist() == [True, True, True, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "give exactly one of fraction"),
        ({"fraction": 0.1, "count": 2}, "give exactly one of fraction"),
        ({"fraction": 1.5}, "mask fraction must be in (0, 1], got 1.5"),
        ({"count": 11}, "mask count must be in 1..10"),
    ],
)
def test_top_k_rejects_bad_sizes(kwargs, message):
    with pytest.raises(SurgeryError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        EntryMask.top_k({"a": torch.ones(10)}, **kwargs)


def test_random_mask_is_seeded():
    shapes = {"a": torch.Size([40]), "b": torch.Size([60])}
    m1, m2, m3 = (EntryMask.random(shapes, fraction=0.1, seed=s) for s in (0, 0, 1))
    assert m1.selected() == 10 and all(torch.equal(m1.masks[n], m2.masks[n]) for n in shapes)
    assert not all(torch.equal(m1.masks[n], m3.masks[n]) for n in shapes)
