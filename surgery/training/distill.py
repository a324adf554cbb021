"""Distillation from the original model: a frozen teacher and the losses that pull a student towards it.

Every surgery starts from a trained model; keeping that model as a teacher lets training aim at what the
model computed before the surgery instead of at the data alone. The pieces work without Lightning:

    teacher = Teacher(original)                                   # frozen, eval mode, no gradients
    distiller = Distiller(DistillConfig(lm_weight=0, kl_weight=1), teacher)
    out = distiller(student, batch)                               # batch: (B, T) token ids
    out.loss.backward()                                           # out.parts: {"ce", "kl", ...} (detached)

Losses (each weighted; a weight of 0 skips the term):
- `ce`: next-token cross-entropy on the batch (nats/token). It is always computed, as the quantity a
  result is judged on and the one the divergence guard watches (`DistillOutput.monitor`).
- `kl`: KL(teacher || student) between the next-token distributions at temperature T, times T^2 (so that
  its gradients keep their size when T changes; Hinton et al. 2015), mean over every position (nats/token).
- `hidden`: alignment of the residual stream after chosen blocks, mean over those blocks: "mse" (mean
  squared difference), "normalized_mse" (per token, squared distance over the teacher's squared norm: the
  residual stream's scale grows with depth, and this keeps every layer and position on one scale) or
  "cosine" (1 - cosine similarity per token).

The teacher is no `nn.Module` attribute of whatever holds it: it stays out of `parameters()`, optimizers,
`state_dict()` and checkpoints, and a resumed run rebuilds it from the source model. It follows the
student's device on first use.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import blocks

HIDDEN_LOSSES = ("mse", "normalized_mse", "cosine")


@dataclass
class DistillConfig:
    """Loss weights and settings (YAML: `model.init_args.distill`).

    Args:
        lm_weight: weight of the next-token cross-entropy.
        kl_weight: weight of KL(teacher || student) on the logits.
        temperature: softmax temperature of both distributions in the KL (> 0); the KL is scaled by T^2.
        hidden_weight: weight of the hidden-state alignment.
        hidden_loss: "mse" | "normalized_mse" | "cosine".
        hidden_layers: blocks whose output residual stream is aligned (negative counts from the end);
            None: every block.
        teacher_dtype: dtype the teacher runs in ("bfloat16" halves its memory on a GPU); None: as loaded.
    """

    lm_weight: float = 1.0
    kl_weight: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss: Literal["mse", "normalized_mse", "cosine"] = "normalized_mse"
    hidden_layers: list[int] | None = None
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
        weights = {"lm_weight": self.lm_weight, "kl_weight": self.kl_weight, "hidden_weight": self.hidden_weight}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise SurgeryError(f"distill weights {weights}: each must be >= 0 and at least one > 0")
        if not self.temperature > 0:
            raise SurgeryError(f"distill.temperature={self.temperature!r}: must be > 0 (1.0 compares the plain distributions)")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise SurgeryError(f"distill.hidden_loss={self.hidden_loss!r}: choose one of {', '.join(HIDDEN_LOSSES)}")

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.hidden_weight > 0

    def describe(self) -> str:
        """'0 x CE + 1 x KL(T=1) + 0.1 x normalized_mse(blocks all)': the terms with a weight."""
        terms = []
        if self.lm_weight:
            terms.append(f"{self.lm_weight:g} x CE")
        if self.kl_weight:
            terms.append(f"{self.kl_weight:g} x KL(T={self.temperature:g})")
        if self.hidden_weight:
            layers = "all" if self.hidden_layers is None else ",".join(map(str, self.hidden_layers))
            terms.append(f"{self.hidden_weight:g} x {self.hidden_loss}(blocks {layers})")
        return " + ".join(terms)


def as_config(config: DistillConfig | dict | None) -> DistillConfig:
    """A DistillConfig from itself, a dict (hyperparameters read back from a checkpoint) or None (LM loss only)."""
    if isinstance(config, DistillConfig):
        return config
    return DistillConfig(**config) if config else DistillConfig()


# -- losses on tensors ---------------------------------------------------------------------------------
def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of logits (B, T, V) predicting ids (B, T) one position ahead.
    `log_probs`: log_softmax(logits) when already computed (the KL at T = 1 shares it)."""
    if log_probs is None:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).mean()


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  student_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)); logits (..., V), fp32.

    Written as sum p_t log p_t (no gradient) - sum p_t log p_s, each one dot product over every position
    and vocabulary entry, so that no (..., V) product is kept for backward. `student_log_probs`:
    log_softmax(student / T), if known.
    """
    s = student_log_probs
    if s is None:
        s = F.log_softmax(_scaled(student_logits, temperature), dim=-1)
    n = s.numel() // s.shape[-1]  # positions
    with torch.no_grad():
        t = F.log_softmax(_scaled(teacher_logits, temperature), dim=-1).flatten()
        p = t.exp()
        neg_entropy = torch.dot(p, t)
    return (neg_entropy - torch.dot(p, s.flatten())) / n * temperature**2


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.float() if temperature == 1 else logits.float() / temperature


def hidden_alignment(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str = "normalized_mse") -> torch.Tensor:
    """Mean over layers of the alignment loss between residual streams (B, T, d), fp32."""
    if len(student) != len(teacher) or not student:
        raise SurgeryError(f"hidden alignment needs the same (non-zero) number of layers: student {len(student)}, teacher {len(teacher)}")
    losses = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if kind == "mse":
            losses.append((s - t).pow(2).mean())
        elif kind == "normalized_mse":
            losses.append(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean())
        elif kind == "cosine":
            losses.append((1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean())
        else:
            raise SurgeryError(f"hidden_loss={kind!r}: choose one of {', '.join(HIDDEN_LOSSES)}")
    return torch.stack(losses).mean()


# -- running models --------------------------------------------------------------------------------------
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


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    hidden: list[torch.Tensor] = field(default_factory=list)  # residual stream after each aligned block


def run(model: nn.Module, ids: torch.Tensor, layers: list[int] | None) -> ModelOutput:
    """Forward `model` on ids (B, T); with `layers`, also the output of those blocks."""
    if not layers:
        return ModelOutput(model(ids).logits)
    with block_outputs(model, layers) as found:
        logits = model(ids).logits
    return ModelOutput(logits, [found[i] for i in layers])


class Teacher:
    """The original model, frozen: eval mode, requires_grad False, run under torch.no_grad.

    Not an nn.Module on purpose (see the module docstring). `dtype` casts its weights once.
    """

    def __init__(self, model: nn.Module, dtype: str | torch.dtype | None = None):
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.model = model.to(dtype) if dtype is not None else model
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, layers: list[int] | None = None) -> ModelOutput:
        param = next(self.model.parameters())
        if param.device != ids.device:
            self.model.to(ids.device)
        self.model.eval()  # whoever holds it may have called .train() on everything it found
        return run(self.model, ids, layers)


@dataclass
class DistillOutput:
    loss: torch.Tensor  # the weighted sum, with gradients
    parts: dict[str, torch.Tensor]  # each term, detached: "ce" always, "kl" / "hidden" when weighted
    monitor: torch.Tensor  # the quantity the divergence guard judges (detached CE, nats/token)
    teacher: ModelOutput | None = None  # reusable for a second student on the same batch


class Distiller:
    """Computes a student's training loss on a batch from `config`'s weights, against `teacher`."""

    def __init__(self, config: DistillConfig | dict | None = None, teacher: Teacher | nn.Module | None = None):
        self.config = as_config(config)
        if isinstance(teacher, nn.Module):
            teacher = Teacher(teacher, self.config.teacher_dtype)
        if self.config.needs_teacher and teacher is None:
            raise SurgeryError(f"distillation with {self.config.describe()} needs a teacher (the original model)")
        self.teacher = teacher if self.config.needs_teacher else None
        self.layers: list[int] | None = None
        if self.config.hidden_weight > 0:
            self.layers = resolve_layers(self.teacher.model, self.config.hidden_layers)

    def __call__(self, student: nn.Module, ids: torch.Tensor, teacher_out: ModelOutput | None = None) -> DistillOutput:
        c = self.config
        out = run(student, ids, self.layers)
        if self.teacher is not None and teacher_out is None:
            teacher_out = self.teacher(ids, self.layers)
        log_probs = F.log_softmax(out.logits.float(), dim=-1)  # shared by the CE and a KL at T = 1
        ce = next_token_ce(out.logits, ids, log_probs)
        parts, loss = {"ce": ce}, c.lm_weight * ce if c.lm_weight else 0.0
        if c.kl_weight:
            at_t = log_probs if c.temperature == 1 else None
            parts["kl"] = kl_to_teacher(out.logits, teacher_out.logits, c.temperature, at_t)
            loss = loss + c.kl_weight * parts["kl"]
        if c.hidden_weight:
            parts["hidden"] = hidden_alignment(out.hidden, teacher_out.hidden, c.hidden_loss)
            loss = loss + c.hidden_weight * parts["hidden"]
        return DistillOutput(loss, {k: v.detach() for k, v in parts.items()}, ce.detach(), teacher_out)
