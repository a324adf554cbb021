"""Which attention layers to keep: the ones whose replacement by a mixer costs most.

A probe twin with a mixer in every layer gets the same transfer into its mixers as the run (attention
output projection, Q/K/V where asked), then `steps` of attention alignment (surgery.xatl.align) on the given
batches; a layer's cost is the alignment error its mixer is left with, averaged over the probe batches after
training. The k layers with the largest error keep softmax attention. Deterministic for a seed and batches.

    ranking = rank_layers(source, "gla", {}, batches, transfer=["attn_out", "qkv"], steps=50, seed=0)
    keep = sorted(layer for layer, _ in ranking[:k])
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.distill import Teacher
from surgery.errors import SurgeryError
from surgery.xatl.align import AttentionAligner
from surgery.xatl.model import hybrid_config_from, hybrid_model
from surgery.xatl.transfer import transfer_shared_weights

MIXER_INPUTS = ("attn_out", "qkv")  # the transfer components that initialize a mixer


def rank_layers(source: nn.Module, mixer: str, mixer_config: dict | None, batches: list[torch.Tensor],
                transfer: list[str] = (), steps: int = 50, lr: float = 2e-3, seed: int = 0) -> list[tuple[int, float]]:
    """[(layer, alignment error after the probe)], worst first. `batches`: token ids (B, T) each."""
    if not batches:
        raise SurgeryError("ranking layers for attn_layers: auto needs at least one batch of data")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = hybrid_model(hybrid_config_from(source.config, mixer, mixer_config, []))
        components = ["norms", *[c for c in transfer if c in MIXER_INPUTS]]
        transfer_shared_weights(source, probe, components)
        aligner = AttentionAligner(Teacher(source), probe.mixer_layers())
        params = [p for n, p in probe.named_parameters() if ".mixer." in n]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for step in range(steps):
            loss, _ = aligner(probe, batches[step % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        totals = dict.fromkeys(probe.mixer_layers(), 0.0)
        with torch.no_grad():
            for ids in batches:
                for i, v in aligner(probe, ids)[1].items():
                    totals[i] += float(v) / len(batches)
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))


def choose_layers(ranking: list[tuple[int, float]], keep: int) -> list[int]:
    """The `keep` costliest layers of a ranking, in layer order."""
    if not 0 < keep < len(ranking):
        raise SurgeryError(f"attn_layers: auto keeps {keep} attention layer(s); choose 1 to {len(ranking) - 1} "
                           f"for a {len(ranking)}-layer model (0 is attn_layers: [])")
    return sorted(layer for layer, _ in ranking[:keep])
