"""Two CPU processes (DDP, gloo) run the tiny removal recipe for 6 steps with buffer broadcasting off:
each rank sees different batches, yet both end with identical weights, sigma values and removal logs,
because the fake LNs all-reduce the sums behind their moving averages (fake_ln.py). The same with the
quick start's losses distilled from a cached top-k teacher, which both ranks open and fill at once."""

import json

import numpy as np
import pytest
import torch
import yaml

from reliability_setup import fit_args, fit_subprocess, load, write_setup

DDP = {
    "trainer": {"max_steps": 6, "val_check_interval": 6, "devices": 2,
                "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                             "init_args": {"process_group_backend": "gloo"},
                             "dict_kwargs": {"broadcast_buffers": False}}},
    "model": {"init_args": {"schedule": {"start": 1, "gaps": {"ln_2": 1, "ln_1_qk": 0, "ln_1_v": 1, "ln_f": 1}}}},
    "checkpoint": {"every_n_train_steps": 3},
}


CACHED = {"lm_weight": 0.5, "kl_weight": 1.0, "teacher_top_k": 4}


@pytest.mark.slow
@pytest.mark.parametrize("distill", [None, CACHED], ids=["lm", "cached-teacher"])
def test_ddp_ranks_hold_identical_sigma_and_weights(tmp_path, distill):
    recipe = write_setup(tmp_path)
    ddp = yaml.safe_load(yaml.safe_dump(DDP))
    if distill:
        ddp["model"]["init_args"]["distill"] = distill
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp))
    args = fit_args(recipe, tmp_path / "run", "--config", str(tmp_path / "ddp.yaml"),
                    "--trainer.callbacks+=reliability_setup.DumpState", "--trainer.callbacks.init_args.dir", str(tmp_path / "dump"))
    done = fit_subprocess(args, tmp_path / "cache", timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["broadcast_buffers"] is False
    assert len(r0["batches"]) == len(r1["batches"]) == 6 and r0["batches"] != r1["batches"]  # each rank its own data
    assert r0["removed"] == r1["removed"] and len(r0["removed"]) == 7
    assert r0["state_dict"].keys() == r1["state_dict"].keys()
    for name, t in r0["state_dict"].items():
        assert torch.equal(t, r1["state_dict"][name]), name
    sigmas = {k: float(v) for k, v in r0["state_dict"].items() if k.endswith(".sigma")}
    assert len(sigmas) == 7 and all(0 < s < 1 for s in sigmas.values())  # measured, not left at 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())  # rank 0 exported the run
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 8 * 32 * 2
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6
    if distill:  # one cache, filled by both ranks with the blocks each trained on
        (cache,) = (tmp_path / "cache" / "teacher").iterdir()
        assert cache.name.endswith("-k4") and int(np.load(cache / "filled.npy").sum()) >= 8
