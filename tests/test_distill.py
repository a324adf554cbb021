"""surgery.training.distill without Lightning: the losses against hand-computed references on two randomized GPT-2s,
the teacher frozen and bit-identical after training a student against it, and the config's error messages."""

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from surgery.training.distill import DistillConfig, Distiller, Teacher, hidden_alignment, kl_to_teacher, next_token_ce
from surgery.errors import SurgeryError


def random_gpt2(seed: int, n_layer: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=50, n_positions=32, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1)  # dropout on: an un-frozen teacher would be noisy
    return GPT2LMHeadModel(cfg)


@pytest.fixture
def pair():
    torch.manual_seed(5)
    return random_gpt2(0), random_gpt2(1), torch.randint(0, 50, (3, 12))


def reference_kl(student_logits, teacher_logits, T):
    """Per position, sum over the vocabulary of p_t * (log p_t - log p_s), in float64, by the definition."""
    s, t = student_logits.double() / T, teacher_logits.double() / T
    p_t = torch.exp(t) / torch.exp(t).sum(-1, keepdim=True)
    p_s = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    total, n = 0.0, 0
    for pt, ps in zip(p_t.reshape(-1, p_t.shape[-1]), p_s.reshape(-1, p_s.shape[-1])):
        total += float(sum(a * math.log(a / b) for a, b in zip(pt.tolist(), ps.tolist())))
        n += 1
    return total / n * T * T


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_matches_the_definition(T):
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7) * 3, torch.randn(2, 5, 7) * 3
    assert kl_to_teacher(s, t, T).item() == pytest.approx(reference_kl(s, t, T), rel=1e-5)
    assert kl_to_teacher(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    # KL(teacher || student), not the reverse: the two directions differ on random distributions
    assert kl_to_teacher(t, s, T).item() != pytest.approx(kl_to_teacher(s, t, T).item(), rel=1e-3)


def test_hidden_losses_match_the_definitions():
    torch.manual_seed(0)
    s = [torch.randn(2, 4, 6), torch.randn(2, 4, 6) * 5]
    t = [torch.randn(2, 4, 6), torch.randn(2, 4, 6) * 5]
    mse = sum(((a.double() - b.double()) ** 2).mean() for a, b in zip(s, t)) / 2
    norm = sum(torch.stack([((a[i, j].double() - b[i, j].double()) ** 2).sum() / (b[i, j].double() ** 2).sum()
                            for i in range(2) for j in range(4)]).mean() for a, b in zip(s, t)) / 2
    cos = sum(torch.stack([1 - a[i, j].double() @ b[i, j].double() / (a[i, j].double().norm() * b[i, j].double().norm())
                           for i in range(2) for j in range(4)]).mean() for a, b in zip(s, t)) / 2
    assert hidden_alignment(s, t, "mse").item() == pytest.approx(mse.item(), rel=1e-5)
    assert hidden_alignment(s, t, "normalized_mse").item() == pytest.approx(norm.item(), rel=1e-5)
    assert hidden_alignment(s, t, "cosine").item() == pytest.approx(cos.item(), rel=1e-5)
    assert hidden_alignment(t, t, "normalized_mse").item() == 0.0


def test_distiller_on_two_random_models_matches_a_hand_computed_loss(pair):
    student, teacher_model, ids = pair
    student.eval()  # deterministic for the reference; the teacher is put in eval mode by Teacher itself
    config = DistillConfig(lm_weight=0.3, kl_weight=0.7, temperature=2.0, hidden_weight=0.2,
                           hidden_loss="normalized_mse", hidden_layers=[0, -2])
    out = Distiller(config, copy.deepcopy(teacher_model))(student, ids)
    # Reference from the models' own outputs: hidden_states[i + 1] is block i's output (before ln_f for i < n - 1)
    teacher_model.eval()
    with torch.no_grad():
        so = student(ids, labels=ids, output_hidden_states=True)
        to = teacher_model(ids, output_hidden_states=True)
    kl = reference_kl(so.logits, to.logits, 2.0)
    hid = hidden_alignment([so.hidden_states[1], so.hidden_states[2]], [to.hidden_states[1], to.hidden_states[2]])
    assert out.parts["ce"].item() == pytest.approx(so.loss.item(), rel=1e-6)  # HF's own next-token loss
    # The KL (0.012 here) is a difference of float32 log-probabilities of size ~4: their rounding, ~1e-7 absolute
    # per position after the T^2 factor, is 1e-5 of it, so the bound is absolute
    assert out.parts["kl"].item() == pytest.approx(kl, rel=0, abs=1e-6)
    assert out.parts["hidden"].item() == pytest.approx(hid.item(), rel=1e-5) and hid.item() > 0.01
    assert out.loss.item() == pytest.approx(0.3 * so.loss.item() + 0.7 * kl + 0.2 * hid.item(), rel=1e-5)
    assert out.monitor.item() == out.parts["ce"].item() and not out.monitor.requires_grad


def test_teacher_gets_no_gradients_and_stays_bit_identical(pair):
    student, teacher_model, ids = pair
    original = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    teacher_model.train()  # as a caller might leave it: the teacher must switch dropout off itself
    distiller = Distiller(DistillConfig(lm_weight=1.0, kl_weight=1.0, hidden_weight=1.0), teacher_model)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    student.train()
    first = None
    for step in range(5):
        out = distiller(student, ids)
        assert not out.teacher.logits.requires_grad and not any(h.requires_grad for h in out.teacher.hidden)
        first = first if first is not None else out.teacher.logits.clone()
        assert torch.equal(out.teacher.logits, first)  # eval mode, same weights: the same logits every step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
    assert all(torch.equal(v, original[k]) for k, v in teacher_model.state_dict().items())
    assert all(p.grad is not None for p in student.parameters())
    assert not torch.equal(student.lm_head.weight, random_gpt2(0).lm_head.weight)  # the student did train


def test_teacher_follows_the_input_device_and_dtype():
    t = Teacher(random_gpt2(0), dtype="bfloat16")
    out = t(torch.randint(0, 50, (1, 4)))
    assert out.logits.dtype == torch.bfloat16 and next(t.model.parameters()).dtype == torch.bfloat16


def test_lm_only_config_runs_without_a_teacher(pair):
    student, _, ids = pair
    student.eval()
    out = Distiller(None)(student, ids)
    assert set(out.parts) == {"ce"} and out.teacher is None
    assert out.loss.item() == out.parts["ce"].item() == pytest.approx(next_token_ce(student(ids).logits, ids).item(), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"lm_weight": 0.0}, "distill weights {'lm_weight': 0.0, 'kl_weight': 0.0, 'hidden_weight': 0.0}: each must be >= 0 and at least one > 0"),
    ({"kl_weight": -1.0}, "each must be >= 0"),
    ({"kl_weight": 1.0, "temperature": 0.0}, "distill.temperature=0.0: must be > 0"),
    ({"hidden_weight": 1.0, "hidden_loss": "l1"}, "distill.hidden_loss='l1': choose one of mse, normalized_mse, cosine"),
])
def test_bad_configs_say_what_to_change(kwargs, message):
    with pytest.raises(SurgeryError, match=message.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")):
        DistillConfig(**kwargs)


def test_missing_teacher_and_bad_layers_are_refused():
    with pytest.raises(SurgeryError, match=r"distillation with 1 x CE \+ 1 x KL\(T=1\) needs a teacher"):
        Distiller(DistillConfig(kl_weight=1.0))
    with pytest.raises(SurgeryError, match=r"distill.hidden_layers=\[3\]: the model has blocks 0..2"):
        Distiller(DistillConfig(hidden_weight=1.0, hidden_layers=[3]), random_gpt2(0))


def test_bracket_gap_is_taken_from_the_better_of_original_and_control():
    from surgery.remove_ln.report import gaps

    above = gaps({"original": 3.70, "control (LN kept)": 3.78, "LN-free": 3.79})  # the fine-tune lost ground
    assert above == pytest.approx({"gap_vs_original": 0.09, "gap_vs_control": 0.01, "gap_vs_best": 0.09})
    below = gaps({"original": 3.70, "control (LN kept)": 3.69, "LN-free": 3.71})  # the fine-tune improved
    assert below == pytest.approx({"gap_vs_original": 0.01, "gap_vs_control": 0.02, "gap_vs_best": 0.02})
    assert gaps({"original": 3.70, "LN-free": 3.72}) == pytest.approx({"gap_vs_original": 0.02, "gap_vs_best": 0.02})
    assert gaps({"original": 3.70, "fine-tuned (LN kept)": 3.72}) == {}
