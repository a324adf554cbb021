"""Running a causal LM for its losses: the final hidden states and head weight that the chunked loss takes
(`surgery.training.chunked_loss`), or the full logits where the head is not a plain Linear; block outputs for
hidden-state alignment."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import blocks
from surgery.training.chunked_loss import TopKTeacher


def resolve_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    n = len(blocks(model))
    chosen = list(range(n)) if layers is None else [i + n if i < 0 else i for i in layers]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise SurgeryError(f"distill.hidden_layers={layers}: the model has blocks 0..{n - 1}")
    return chosen


@contextmanager
def block_outputs(model: nn.Module, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the context, each forward of `model` fills {block index: its output residual stream (B, T, d)}."""
    found: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:
        def keep(module, args, output, i=i):
            found[i] = output[0] if isinstance(output, tuple) else output
        handles.append(blocks(model)[i].register_forward_hook(keep))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config fields that change head(h)


def head_weight(model: nn.Module) -> torch.Tensor | None:
    """The LM head's weight (V, d) when the logits are exactly `final hidden @ weight.T` (a bias-free Linear head
    with no forward hooks, and no logit scaling or soft-capping in the config), else None: such a model is run for
    its full logits (a hook on the head, e.g. one that edits the logits, then still runs)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    if head._forward_hooks or head._forward_pre_hooks:  # nn.Module's hook dicts (checked by tests/test_chunked_loss.py)
        return None
    if any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in SCALED_LOGITS):
        return None
    return head.weight


class ModelOutput:
    """A forward's result: the full logits (B, T, V), or the `final` hidden states (B, T, d) and `head` weight (V, d)
    that the chunked loss takes instead (`logits` then computes them on request); `topk`: a cached teacher's
    targets; `hidden`: the output residual stream of each aligned block."""

    def __init__(self, logits: torch.Tensor | None = None, hidden: list[torch.Tensor] | None = None,
                 final: torch.Tensor | None = None, head: torch.Tensor | None = None, topk: TopKTeacher | None = None):
        self._logits, self.hidden, self.final, self.head, self.topk = logits, hidden or [], final, head, topk

    @property
    def logits(self) -> torch.Tensor:
        return self._logits if self._logits is not None else self.final @ self.head.t()


def run(model: nn.Module, ids: torch.Tensor, layers: list[int] | None, chunked: bool = True) -> ModelOutput:
    """Forward `model` on ids (B, T): its final hidden states and head when `chunked` and the head allows it (see
    `head_weight`), else its logits; with `layers`, also the output of those blocks."""
    weight = head_weight(model) if chunked else None
    with block_outputs(model, layers or []) as found:
        if weight is None:
            out = ModelOutput(model(ids).logits)
        else:
            out = ModelOutput(final=model.base_model(input_ids=ids, use_cache=False).last_hidden_state, head=weight)
    out.hidden = [found[i] for i in layers or []]
    return out
