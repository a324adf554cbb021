"""Stage 1 of a distilled transfer: each mixer learns to reproduce the source's attention output.

The source (teacher) runs on a batch; at every mixer layer i, the input its attention read (the output of
the block's attention norm, (B, T, d)) goes through the student's mixer, and the mixer's output is pulled
towards the source attention's output (B, T, d) (LoLCATs' attention transfer; MOHAWK's and RADLADS' first
stages). The layers are independent: one teacher forward feeds all of them, and no gradient crosses layers.

    aligner = AttentionAligner(Teacher(source), student.mixer_layers())
    loss, per_layer = aligner(student, ids)      # per_layer: {layer: detached loss}

Module locations come from `surgery.families` (the family's `attn` path), so this knows no model by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from surgery.training.distill import Teacher, hidden_alignment
from surgery.errors import SurgeryError
from surgery.families import blocks, family_of, get_module
from surgery.xatl.hybrid.core import call_mixer


@contextmanager
def attention_io(model: nn.Module, layers: list[int]) -> Iterator[dict[int, tuple]]:
    """Within the context, each forward of `model` fills {layer: (attention input, attention output, the rotary
    position embeddings attention was handed or None)}."""
    attn_path = family_of(model).attn
    found: dict[int, tuple] = {}
    handles = []
    for i in layers:
        def keep(module, args, kwargs, output, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            found[i] = (x, output[0] if isinstance(output, tuple) else output, kwargs.get("position_embeddings"))
        handles.append(get_module(blocks(model)[i], attn_path).register_forward_hook(keep, with_kwargs=True))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


class AttentionAligner:
    """Alignment loss of the student's mixers to the teacher's attention, all `layers` at once."""

    def __init__(self, teacher: Teacher, layers: list[int], kind: str = "normalized_mse"):
        if not layers:
            raise SurgeryError("attention alignment needs at least one mixer layer")
        self.teacher, self.layers, self.kind = teacher, list(layers), kind

    def targets(self, ids: torch.Tensor) -> dict[int, tuple]:
        """{layer: (teacher attention input, teacher attention output, its position embeddings)} for a batch of
        ids (B, T)."""
        with torch.no_grad(), attention_io(self.teacher.model, self.layers) as found:
            self.teacher(ids)
        return dict(found)

    def __call__(self, student: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(mean loss over layers, {layer: its loss, detached}); gradients reach the mixers only."""
        attn_path = family_of(student).attn
        per_layer = {}
        for i, (x, target, rotary) in self.targets(ids).items():
            mixer = get_module(blocks(student)[i], attn_path).mixer
            out, _ = call_mixer(mixer, x.to(next(mixer.parameters()).dtype), position_embeddings=rotary)
            per_layer[i] = hidden_alignment([out], [target], self.kind)
        loss = torch.stack(list(per_layer.values())).mean()
        return loss, {i: v.detach() for i, v in per_layer.items()}
