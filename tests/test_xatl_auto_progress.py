"""`attn_layers: auto` probes for minutes on a CPU: a progress bar names the stage and the layer being probed."""

import torch

from tiny_models import tiny_gpt2
from surgery.xatl.training.auto_layers import rank_layers


def test_the_probe_shows_each_layer_it_measures(capsys):
    src = tiny_gpt2(seed=2, n_layer=3)
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ranking = rank_layers(src, "retention", None, batches, ["attn_out", "qkv"], steps=2, criterion="kl", progress=True)
    err = capsys.readouterr().err
    assert "attn_layers auto: aligning the probe's mixers" in err
    assert all(f"attn_layers auto: KL with layer {i} of 3 replaced" in err for i in range(3))
    assert "5/5" in err  # 2 alignment steps + 3 layers
    assert sorted(i for i, _ in ranking) == [0, 1, 2]


def test_no_bar_when_asked_for_none(capsys):
    src = tiny_gpt2(seed=2, n_layer=2)
    rank_layers(src, "retention", None, [torch.randint(0, 64, (2, 16))], ["qkv"], steps=1, progress=False)
    assert "attn_layers auto" not in capsys.readouterr().err
