"""Which attention layers to keep: the ones whose replacement by a mixer costs most.

A probe twin with a mixer in every layer gets the same transfer into its mixers as the run (attention
output projection, Q/K/V where asked), then `steps` of attention alignment (surgery.xatl.training.align) on the given
batches. A layer's cost is then, by `criterion`:
- "kl": KL(source || the source with that one layer's attention replaced by its probe mixer), mean over the
  batches (nats/token): what the model's predictions lose when that layer alone is replaced;
- "alignment": the alignment error its mixer is left with (normalized MSE of the layer's output). A layer can
  be hard to imitate and yet matter little downstream, or the reverse: on the tiny GPT-2 with GLA mixers,
  block 0 has the smallest alignment error and the second-largest KL.
The k costliest layers keep softmax attention. Deterministic for a seed and batches.

    ranking = rank_layers(source, "gla", {}, batches, transfer=["attn_out", "qkv"], steps=50, seed=0)
    keep = sorted(layer for layer, _ in ranking[:k])
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from torch import nn

from surgery.training.distill import Teacher, kl_to_teacher
from surgery.errors import SurgeryError
from surgery.families import blocks, family_of, get_module
from surgery.xatl.training.align import AttentionAligner
from surgery.xatl.hybrid.model import hybrid_config_from, hybrid_model
from surgery.xatl.transfer.weights import transfer_shared_weights

MIXER_INPUTS = ("attn_out", "qkv", "v")  # the transfer components that initialize a mixer
CRITERIA = ("kl", "alignment")


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise SurgeryError(f"auto_attn.criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")


def rank_layers(source: nn.Module, mixer: str, mixer_config: dict | None, batches: list[torch.Tensor],
                transfer: list[str] = (), steps: int = 50, lr: float = 2e-3, seed: int = 0,
                criterion: str = "kl", progress: bool | None = None) -> list[tuple[int, float]]:
    """[(layer, cost after the probe)], costliest first. `batches`: token ids (B, T) each. `progress`: a bar
    naming the stage and the layer being probed (None: on a terminal only; the probe takes minutes on a CPU)."""
    if not batches:
        raise SurgeryError("ranking layers for attn_layers: auto needs at least one batch of data")
    check_criterion(criterion)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = hybrid_model(hybrid_config_from(source.config, mixer, mixer_config, []))
        components = ["norms", *[c for c in transfer if c in MIXER_INPUTS]]
        transfer_shared_weights(source, probe, components)
        teacher = Teacher(source)
        aligner = AttentionAligner(teacher, probe.mixer_layers())
        params = [p for n, p in probe.named_parameters() if ".mixer." in n]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        layers = probe.mixer_layers()
        bar = tqdm(total=steps + (len(layers) if criterion == "kl" else 0), disable=None if progress is None else not progress,
                   desc="attn_layers auto: aligning the probe's mixers", unit="step", dynamic_ncols=True)
        for step in range(steps):
            loss, _ = aligner(probe, batches[step % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
        probe.eval()
        if criterion == "kl":
            totals = {}
            for i in layers:
                bar.set_description(f"attn_layers auto: KL with layer {i} of {len(layers)} replaced")
                totals[i] = _lone_mixer_kl(teacher, probe, i, mixer, mixer_config, batches)
                bar.update()
            bar.close()
        else:
            bar.close()
            totals = dict.fromkeys(probe.mixer_layers(), 0.0)
            with torch.no_grad():
                for ids in batches:
                    for i, v in aligner(probe, ids)[1].items():
                        totals[i] += float(v) / len(batches)
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))


@torch.no_grad()
def _lone_mixer_kl(teacher: Teacher, probe: nn.Module, layer: int, mixer: str, mixer_config: dict | None,
                   batches: list[torch.Tensor]) -> float:
    """KL(source || source with attention replaced by the probe's mixer at `layer` only), mean over batches."""
    source = teacher.model
    n = len(blocks(source))
    lone = hybrid_model(hybrid_config_from(source.config, mixer, mixer_config, [j for j in range(n) if j != layer]))
    transfer_shared_weights(source, lone, ["embeddings", "norms", "mlp", "lm_head", "attn_layers"])
    fam = family_of(probe)
    mixer_of = lambda model: get_module(blocks(model)[layer], fam.attn).mixer  # noqa: E731
    mixer_of(lone).load_state_dict(mixer_of(probe).state_dict())
    lone.eval()
    return sum(float(kl_to_teacher(lone(ids).logits, teacher(ids).logits)) for ids in batches) / len(batches)


def choose_layers(ranking: list[tuple[int, float]], keep: int) -> list[int]:
    """The `keep` costliest layers of a ranking, in layer order."""
    if not 0 < keep < len(ranking):
        raise SurgeryError(f"attn_layers: auto keeps {keep} attention layer(s); choose 1 to {len(ranking) - 1} "
                           f"for a {len(ranking)}-layer model (0 is attn_layers: [])")
    return sorted(layer for layer, _ in ranking[:keep])
