"""The removal schedule: order, validation, and the callback's state across a checkpoint."""

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.remove_ln.points import find_points, prepare_for_removal
from surgery.remove_ln.schedule import RemovalCallback, RemovalSchedule
from remove_ln_models import tiny_gpt2


def test_gaps_order_the_kinds_block_by_block():
    steps = RemovalSchedule(start=20, gaps={"ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3, "ln_f": 2}).removal_steps(2)
    assert steps == {"h.0.ln_2": 20, "h.1.ln_2": 22, "h.0.ln_1_qk": 24, "h.1.ln_1_qk": 26,
                     "h.0.ln_1_v": 29, "h.1.ln_1_v": 32, "ln_f": 34}


def test_gpt2_small_schedule_of_the_2025_recipe_ends_in_time():
    """12 blocks at 2/2/3/2 steps from step 20: every LN gone well before step 300."""
    schedule = RemovalSchedule(start=20, gaps={"ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3, "ln_f": 2})
    steps = schedule.removal_steps(12)
    assert len(steps) == 37 and steps["ln_f"] == 20 + 11 * 2 + 12 * 2 + 12 * 3 + 2 == 104
    special = RemovalSchedule(special_first=True, special_eot=True, drop_eot_after=20, drop_first_after=40)
    assert special.last_step(12) == 104 + 40


def test_explicit_events_must_name_every_point_of_the_model():
    events = {"h.0.ln_2": 1, "h.0.ln_1_qk": 2, "h.0.ln_1_v": 3, "h.7.ln_2": 4}
    with pytest.raises(SurgeryError, match=r"names \['h.7.ln_2'\] and omits \['h.1.ln_2'.*exactly: h.0.ln_2, h.1.ln_2"):
        RemovalSchedule(events=events).removal_steps(2)
    with pytest.raises(SurgeryError, match="non-negative integers"):
        RemovalSchedule(events={**{f"h.{i}.{k}": 5 for i in range(2) for k in ("ln_2", "ln_1_qk", "ln_1_v")}, "ln_f": -1}).removal_steps(2)


@pytest.mark.parametrize("kwargs", [{"gaps": {"ln_3": 2}}, {"gaps": {"ln_2": -1}}, {"start": -5}])
def test_bad_gaps_are_refused_with_the_valid_kinds(kwargs):
    with pytest.raises(SurgeryError, match="ln_2, ln_1_qk, ln_1_v, ln_f"):
        RemovalSchedule(**kwargs).removal_steps(2)


def measured_model(seed=0):
    model = tiny_gpt2(seed)
    points = prepare_for_removal(model)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
    return model, points


def test_callback_removes_what_is_due_and_drops_specials_on_time():
    model, points = measured_model()
    schedule = RemovalSchedule(start=3, gaps={"ln_2": 1, "ln_1_qk": 1, "ln_1_v": 1, "ln_f": 1},
                               special_first=True, drop_first_after=2)
    callback = RemovalCallback(schedule, points)
    assert callback.apply(2) == []
    assert callback.apply(4) == ["h.0.ln_2", "h.1.ln_2"]  # one batch may pass several due steps
    assert callback.apply(9) == ["h.0.ln_1_qk", "h.1.ln_1_qk", "h.0.ln_1_v", "h.1.ln_1_v", "ln_f"]
    assert all(ln.is_fake and bool(ln.special_first) for ln in points.values())
    callback.apply(10)
    assert all(bool(ln.special_first) for ln in points.values())
    callback.apply(11)  # last removal at 9, drop_first_after=2
    assert not any(ln.has_specials for ln in points.values())
    assert [name for _, name in callback.removed][-1] == "ln_f"


def test_state_mid_removal_survives_a_checkpoint_round_trip():
    model, points = measured_model()
    schedule = RemovalSchedule(start=0, gaps={"ln_2": 1, "ln_1_qk": 1, "ln_1_v": 1, "ln_f": 1})
    callback = RemovalCallback(schedule, points, table={n: 1.0 + i for i, n in enumerate(points)})
    callback.apply(3)  # h.0.ln_2 .. h.1.ln_1_qk fake, the rest real
    saved_model, saved_callback = model.state_dict(), callback.state_dict()

    fresh, fresh_points = measured_model(seed=1)
    fresh.load_state_dict(saved_model)
    restored = RemovalCallback(schedule, find_points(fresh))
    restored.load_state_dict(saved_callback)
    for name, ln in points.items():
        twin = fresh_points[name]
        assert twin.is_fake == ln.is_fake and float(twin.sigma) == float(ln.sigma)
        assert float(twin.avg_std) == float(ln.avg_std) and int(twin.avg_count) == int(ln.avg_count)
    assert sorted(n for n, ln in fresh_points.items() if ln.is_fake) == ["h.0.ln_1_qk", "h.0.ln_2", "h.1.ln_1_qk", "h.1.ln_2"]
    assert restored.removed == callback.removed and restored.table == callback.table
    assert not any(ln.track for ln in fresh_points.values())  # a table run never measures again
    ids = torch.randint(0, 64, (2, 16))
    model.eval(), fresh.eval()
    assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert restored.apply(6) == callback.apply(6)
