"""The cached teacher: its top-k targets are the teacher's own, stored once and reused without the teacher, and the
distillation loss on them equals the (k + 1)-bin KL computed from the live teacher's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from surgery.data import teacher_cache
from surgery.data.teacher_cache import TeacherCache, model_key, top_k
from surgery.errors import SurgeryError
from surgery.training.distill import DistillConfig, Distiller

BLOCK, K = 16, 8


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from tiny_models import tiny_gpt2

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    tokens = np.random.default_rng(0).integers(0, 64, size=10 * BLOCK + 5).astype(np.int32)
    return tiny_gpt2(seed=1).train(), tiny_gpt2(seed=2), tokens


def batch(tokens: np.ndarray, rows: list[int]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(tokens[r * BLOCK : (r + 1) * BLOCK].astype(np.int64)) for r in rows])


def test_cached_targets_are_the_teachers_top_k_and_are_reused_without_it(setup):
    student, teacher, tokens = setup
    distiller = Distiller(DistillConfig(lm_weight=0.5, kl_weight=1.0, teacher_top_k=K), teacher)
    distiller.attach_cache(tokens, BLOCK)
    ids = batch(tokens, [3, 7, 3])
    loss = distiller(student, ids).loss
    with torch.no_grad():
        want = top_k(F.log_softmax(teacher(ids).logits, -1), K)
    cache = distiller.cache
    got = cache.targets(ids, teacher=None)  # all filled now: the teacher is not called
    for a, b in zip(got, want):
        assert torch.allclose(a.to(b.dtype), b, atol=1e-6)
    assert cache.filled.sum() == 2 and cache.path.parent == teacher_cache.cache_dir() / "teacher"
    again = TeacherCache(tokens, BLOCK, K, model_key(teacher), 64)  # another run: same directory, blocks filled
    assert again.path == cache.path and torch.equal(again.targets(ids, teacher=None)[0], got[0])
    # the loss on the cache is the one on the live teacher's coarse distribution (test_chunked_loss checks that)
    live = Distiller(DistillConfig(lm_weight=0.5, kl_weight=1.0, chunk_size=4), teacher)
    assert loss.item() <= live(student, ids).loss.item() + 1e-6  # the coarse KL never exceeds the full one


def test_another_teacher_or_k_is_another_cache(setup):
    student, teacher, tokens = setup
    a = TeacherCache(tokens, BLOCK, K, model_key(teacher))
    assert TeacherCache(tokens, BLOCK, K, model_key(student)).path != a.path
    assert TeacherCache(tokens, BLOCK, K + 1, model_key(teacher)).path != a.path
    assert TeacherCache(tokens[::-1].copy(), BLOCK, K, model_key(teacher)).path != a.path


def test_build_fills_only_missing_blocks(setup):
    _, teacher, tokens = setup
    cache = TeacherCache(tokens, BLOCK, K, model_key(teacher))
    log_probs = lambda ids: F.log_softmax(teacher(ids).logits, -1)  # noqa: E731
    assert cache.build([1, 2, 3], lambda rows: batch(tokens, list(rows)), log_probs) == 3
    assert cache.build([2, 3, 4], lambda rows: batch(tokens, list(rows)), log_probs) == 1
    assert list(np.flatnonzero(cache.filled)) == [1, 2, 3, 4]


def test_refusals_name_the_fix(setup):
    student, teacher, tokens = setup
    cache = TeacherCache(tokens, BLOCK, K, model_key(teacher))
    with pytest.raises(SurgeryError, match="not built on: the cache covers the training split"):
        cache.rows_of(torch.zeros(1, BLOCK, dtype=torch.long) + 63)
    with pytest.raises(SurgeryError, match="set data.block_size to the cache's"):
        cache.rows_of(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    with pytest.raises(SurgeryError, match="teacher_top_k=64: must be between 1 and the vocabulary size - 1"):
        TeacherCache(tokens, BLOCK, 64, "x", vocab_size=64)
    with pytest.raises(SurgeryError, match="no teacher cache is open"):
        Distiller(DistillConfig(kl_weight=1.0, teacher_top_k=K), teacher)(student, batch(tokens, [0]))


@pytest.mark.parametrize("kwargs, message", [
    ({"kl_weight": 1.0, "teacher_top_k": 0}, "must be >= 1"),
    ({"kl_weight": 1.0, "teacher_top_k": 8, "temperature": 2.0}, "set kl_weight > 0, temperature 1 and hidden_weight 0"),
    ({"kl_weight": 1.0, "teacher_top_k": 8, "hidden_weight": 1.0}, "set kl_weight > 0, temperature 1 and hidden_weight 0"),
    ({"lm_weight": 1.0, "teacher_top_k": 8}, "set kl_weight > 0"),
    ({"chunk_size": -1}, "distill.chunk_size=-1: must be >= 0"),
])
def test_bad_cache_settings_say_what_to_change(kwargs, message):
    with pytest.raises(SurgeryError, match=message):
        DistillConfig(**kwargs)
