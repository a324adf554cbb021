"""The comparison's arithmetic: steps to reach the scratch run's final validation loss."""

import json

import pytest

from surgery.errors import SurgeryError
from surgery.cli import main
from surgery.cli.commands.compare import plot, steps_to_match, summarize, val_curve


def test_steps_to_match_and_summary(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,4,5.0,\n0,9,,4.5\n0,19,,4.0\n0,29,,3.5\n")
    xatl = val_curve(tmp_path)
    assert xatl == [(10, 4.5), (20, 4.0), (30, 3.5)]
    scratch = [(10, 6.0), (20, 4.8), (30, 4.1)]
    assert steps_to_match(xatl, 4.1) == 20 and steps_to_match(xatl, 3.0) is None
    summary = summarize(xatl, scratch, 30)
    assert summary["steps_to_match_scratch_final_loss"] == 20
    assert summary["steps_to_match_ratio"] == 20 / 30 and summary["scratch_final_val_loss"] == 4.1
    json.dumps(summary)
    plot(xatl, scratch, summary, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_val_curve_joins_the_logs_of_a_resumed_run(tmp_path):
    """A resumed arm keeps its earlier log as metrics-<n>.csv; steps logged again after the resume win."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics-1.csv").write_text("epoch,step,val/loss\n0,9,5.0\n0,19,4.5\n0,29,4.4\n")
    (logs / "metrics.csv").write_text("epoch,step,val/loss\n0,29,4.3\n0,39,4.1\n")
    assert val_curve(tmp_path) == [(10, 5.0), (20, 4.5), (30, 4.3), (40, 4.1)]


def fake_arms(monkeypatch, every: int, steps_done: int):
    """train_arm replaced by one that writes a validation log every `every` steps up to `steps_done`."""
    import surgery.cli.commands.compare as compare

    calls = []

    def train_arm(recipe, run_dir, args, steps=None):
        calls.append((run_dir.name, args))
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        rows = "".join(f"0,{s - 1},{5 - s / 100}\n" for s in range(every, steps_done + 1, every))
        (run_dir / "logs" / "metrics.csv").write_text("epoch,step,val/loss\n" + rows)
        return steps_done

    monkeypatch.setattr(compare, "train_arm", train_arm)
    return calls


RECIPE = "recipes/xatl/quickstart-mamba.yaml"  # max_steps 300, val_check_interval 25


def test_fewer_steps_than_the_validation_interval_is_refused_before_training(tmp_path, monkeypatch, capsys):
    calls = fake_arms(monkeypatch, 25, 10)
    assert main(["compare", RECIPE, "--out", str(tmp_path / "c"), "--steps", "10"]) == 2
    assert capsys.readouterr().err.strip() == (
        "surgery compare: error: 10 steps is fewer than trainer.val_check_interval=25: no validation loss would be logged to "
        "compare. Use --steps 25 or more, or add -- --trainer.val_check_interval 2")
    assert calls == []
    # With the interval lowered it runs; an arm that logged no validation is named, not an IndexError.
    fake_arms(monkeypatch, 2, 10)
    assert main(["compare", RECIPE, "--out", str(tmp_path / "c"), "--steps", "10", "--", "--trainer.val_check_interval", "2"]) == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["total_steps"] == 10
    fake_arms(monkeypatch, 25, 10)
    assert main(["compare", RECIPE, "--out", str(tmp_path / "d"), "--steps", "10", "--", "--trainer.val_check_interval=20"]) == 2
    assert "surgery compare: error: 10 steps is fewer than trainer.val_check_interval=20" in capsys.readouterr().err
    fake_arms(monkeypatch, 25, 10)  # arms that logged no validation loss all the same (e.g. no validation data)
    assert main(["compare", RECIPE, "--out", str(tmp_path / "e"), "--steps", "10", "--", "--trainer.val_check_interval", "2"]) == 2
    assert f"no validation loss was logged in {tmp_path / 'e' / 'xatl'} (logs/metrics.csv)" in capsys.readouterr().err


def test_a_rerun_with_other_steps_does_not_reuse_finished_arms(tmp_path, monkeypatch, capsys):
    from surgery.cli.commands.compare import train_arm

    fake_arms(monkeypatch, 2, 10)
    out = tmp_path / "c"
    assert main(["compare", RECIPE, "--out", str(out), "--steps", "10", "--", "--trainer.val_check_interval", "2"]) == 0
    capsys.readouterr()
    assert main(["compare", RECIPE, "--out", str(out), "--steps", "20", "--", "--trainer.val_check_interval", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"surgery compare: error: {out} holds a comparison made with other settings (steps: 10 -> 20): its arms would not be "
        f"comparable with this command's. Choose another --out, or delete {out} to redo it")
    assert main(["compare", RECIPE, "--out", str(out), "--steps", "10", "--", "--trainer.val_check_interval", "5"]) == 2
    assert 'overrides: ["--trainer.val_check_interval", "2"] -> ["--trainer.val_check_interval", "5"]' in capsys.readouterr().err
    (out / "xatl" / "metrics.json").write_text('{"steps": 10}')  # a directory from before command.json existed
    with pytest.raises(SurgeryError, match=f"{out / 'xatl'} finished 10 steps before, this comparison asks for 20: "
                                           "choose another --out, or delete .* to retrain it"):
        train_arm(RECIPE, out / "xatl", [], 20)
    assert train_arm(RECIPE, out / "xatl", [], 10) == 10  # the same steps: reused


def test_the_plot_says_whether_the_transferred_weights_were_unfrozen(tmp_path):
    import torch

    from surgery.cli.commands.compare import xatl_label

    def ckpt(unfrozen_at):
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        torch.save({"state_dict": {}, "loops": {}, "global_step": 10, "optimizer_states": [], "lr_schedulers": [],
                    "xatl_unfrozen_at": unfrozen_at}, tmp_path / "checkpoints" / "last.ckpt")
        return xatl_label(tmp_path)

    assert ckpt(None) == "XATL (transferred, frozen throughout: never unfrozen)"  # max_steps below unfreeze.step
    assert ckpt(100) == "XATL (transferred, frozen until step 100)"
    assert ckpt(0) == "XATL (transferred, trained throughout)"
    assert xatl_label(tmp_path / "none") == "XATL (transferred)"


def test_the_scratch_arm_keeps_the_attention_layers_the_xatl_arm_chose(tmp_path, monkeypatch):
    """With attn_layers: auto the scratch arm is built with the layers the XATL arm kept (read from its
    metrics.json), since it has no source to rank with; the arguments it gets build that model."""
    import surgery.cli.commands.compare as compare
    from surgery.xatl.training.module import XatlLM

    calls = fake_arms(monkeypatch, 2, 10)
    xatl = tmp_path / "c" / "xatl"
    xatl.mkdir(parents=True)
    (xatl / "metrics.json").write_text(json.dumps({"steps": 10, "xatl": {"attn_layers": [2]}}))
    hybrid = "recipes/xatl/quickstart-gla-hybrid.yaml"  # attn_layers: auto
    assert main(["compare", hybrid, "--out", str(tmp_path / "c"), "--steps", "10", "--",
                         "--trainer.val_check_interval", "2"]) == 0
    assert [name for name, _ in calls] == ["xatl", "scratch"]  # the XATL arm first: the scratch arm reads it
    args = calls[1][1]
    assert args[args.index("--model.init_args.attn_layers") + 1] == "[2]"
    scratch = XatlLM("checkpoints/tiny-gpt2-stdlib", mixer="gla", mixer_config={"key_dim": 128, "window": 16},
                     attn_layers=json.loads("[2]"), transfer=[], freeze=False, align=None, distill=None)
    assert scratch.model.config.attn_layers == [2] and scratch.model.mixer_layers() == [0, 1, 3]
    with pytest.raises(SurgeryError, match="attn_layers: auto use the source as a teacher"):
        XatlLM("checkpoints/tiny-gpt2-stdlib", mixer="gla", attn_layers="auto", transfer=[], freeze=False,
               align=None, distill=None)


def test_a_comparison_refused_before_training_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A setting the XATL arm refuses (here: an unknown key) writes no command.json, so the corrected rerun into the
    same --out runs instead of being refused as "a comparison made with other settings"."""
    import surgery.cli.commands.compare as compare

    def refusing_arm(recipe, run_dir, args, steps=None):
        run_dir.mkdir(parents=True, exist_ok=True)  # as LightningCLI makes the run directory before it refuses
        raise SurgeryError("model.init_args.mixr is not a setting")

    monkeypatch.setattr(compare, "train_arm", refusing_arm)
    out = tmp_path / "c"
    assert main(["compare", RECIPE, "--out", str(out), "--steps", "30", "--", "--model.init_args.mixr", "gla"]) == 2
    assert "model.init_args.mixr is not a setting" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # an --out that existed before keeps what it held; only the comparison's files go
    (out / "notes.txt").write_text("mine")
    assert main(["compare", RECIPE, "--out", str(out), "--steps", "30", "--", "--model.init_args.mixr", "gla"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    fake_arms(monkeypatch, 2, 10)
    assert main(["compare", RECIPE, "--out", str(out), "--steps", "10", "--", "--trainer.val_check_interval", "2"]) == 0
