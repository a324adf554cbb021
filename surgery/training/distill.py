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

CE and KL come from the final hidden states and the LM head in chunks (`surgery.training.chunked_loss`: the full
logits never exist); with `teacher_top_k` the KL reads the teacher's cached top-k log-probabilities instead of
running it (`surgery.data.teacher_cache`).

The teacher is no `nn.Module` attribute of whatever holds it: it stays out of `parameters()`, optimizers,
`state_dict()` and checkpoints, and a resumed run rebuilds it from the source model. It follows the
student's device on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.training.chunked_loss import LiveTeacher, TopKTeacher, chunked_lm_losses
from surgery.training.forward import ModelOutput, resolve_layers, run

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
        teacher_top_k: distil from the teacher's cached top-k next-token log-probabilities plus the remaining
            mass (`surgery.data.teacher_cache`: computed once per teacher, corpus and block size, beside the
            token cache) instead of running it on every batch; None: the live teacher. Temperature 1 only.
        chunk_size: positions per chunk of the loss (`surgery.training.chunked_loss`: the full logits are never
            built); None: `auto_chunk` (a chunk's logits about the size of the hidden states); 0: the plain
            full-logits computation.
    """

    lm_weight: float = 1.0
    kl_weight: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss: Literal["mse", "normalized_mse", "cosine"] = "normalized_mse"
    hidden_layers: list[int] | None = None
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    teacher_top_k: int | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        weights = {"lm_weight": self.lm_weight, "kl_weight": self.kl_weight, "hidden_weight": self.hidden_weight}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise SurgeryError(f"distill weights {weights}: each must be >= 0 and at least one > 0")
        if not self.temperature > 0:
            raise SurgeryError(f"distill.temperature={self.temperature!r}: must be > 0 (1.0 compares the plain distributions)")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise SurgeryError(f"distill.hidden_loss={self.hidden_loss!r}: choose one of {', '.join(HIDDEN_LOSSES)}")
        if self.chunk_size is not None and self.chunk_size < 0:
            raise SurgeryError(f"distill.chunk_size={self.chunk_size}: must be >= 0 (positions per chunk; 0: full logits)")
        if self.teacher_top_k is not None:
            if self.teacher_top_k < 1:
                raise SurgeryError(f"distill.teacher_top_k={self.teacher_top_k}: must be >= 1 (e.g. 32), or null for the live teacher")
            if self.temperature != 1 or self.hidden_weight > 0 or self.kl_weight == 0:
                raise SurgeryError("distill.teacher_top_k caches the teacher's next-token log-probabilities at temperature 1 for "
                                   "the KL alone: set kl_weight > 0, temperature 1 and hidden_weight 0, or teacher_top_k null")

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.hidden_weight > 0

    def describe(self) -> str:
        """'0 x CE + 1 x KL(T=1) + 0.1 x normalized_mse(blocks all)': the terms with a weight."""
        terms = []
        if self.lm_weight:
            terms.append(f"{self.lm_weight:g} x CE")
        if self.kl_weight:
            cached = f", cached top-{self.teacher_top_k}" if self.teacher_top_k else ""
            terms.append(f"{self.kl_weight:g} x KL(T={self.temperature:g}{cached})")
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


def lm_cross_entropy(model: nn.Module, ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) of `model` on ids (B, T), by the chunked loss when it applies."""
    out = run(model, ids, None, chunked=chunk_size != 0)
    if out.final is None:
        return next_token_ce(out.logits, ids)
    return chunked_lm_losses(out.final, out.head, ids, chunk_size=chunk_size)[0]


class Teacher:
    """The original model, frozen: eval mode, requires_grad False, run under torch.no_grad.

    Not an nn.Module on purpose (see the module docstring). `dtype` casts its weights once.
    """

    def __init__(self, model: nn.Module, dtype: str | torch.dtype | None = None, chunked: bool = True):
        self.chunked = chunked
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
        return run(self.model, ids, layers, self.chunked)


@dataclass
class DistillOutput:
    loss: torch.Tensor  # the weighted sum, with gradients
    parts: dict[str, torch.Tensor]  # each term, detached: "ce" always, "kl" / "hidden" when weighted
    monitor: torch.Tensor  # the quantity the divergence guard judges (detached CE, nats/token)
    teacher: ModelOutput | None = None  # reusable for a second student on the same batch


class Distiller:
    """Computes a student's training loss on a batch from `config`'s weights, against `teacher` (live) or, with
    `config.teacher_top_k`, against the cache that `attach_cache` opens (the teacher then fills blocks it lacks)."""

    def __init__(self, config: DistillConfig | dict | None = None, teacher: Teacher | nn.Module | None = None):
        self.config = as_config(config)
        chunked = self.config.chunk_size != 0
        if isinstance(teacher, nn.Module):
            teacher = Teacher(teacher, self.config.teacher_dtype, chunked)
        if self.config.needs_teacher and teacher is None:
            raise SurgeryError(f"distillation with {self.config.describe()} needs a teacher (the original model)")
        self.teacher = teacher if self.config.needs_teacher else None
        self.cache = None  # a surgery.data.teacher_cache.TeacherCache, opened by attach_cache
        self.layers: list[int] | None = None
        if self.config.hidden_weight > 0:
            self.layers = resolve_layers(self.teacher.model, self.config.hidden_layers)

    def attach_cache(self, tokens, block_size: int) -> None:
        """With `teacher_top_k`, open (creating if needed) the teacher's cache for the blocks of `tokens` (a 1-D
        int array: the training split) of `block_size`; a no-op otherwise."""
        if self.config.teacher_top_k is None or self.cache is not None:
            return
        from surgery.data.teacher_cache import TeacherCache, model_key

        model = self.teacher.model
        self.cache = TeacherCache(tokens, block_size, self.config.teacher_top_k, model_key(model), model.config.vocab_size)

    def cached_teacher(self, ids: torch.Tensor) -> ModelOutput | None:
        """The cached targets for ids (B, T) with `teacher_top_k` (outside a compiled step: the lookup hashes the
        blocks on the host), else None."""
        return self.teacher_output(ids) if self.config.teacher_top_k is not None else None

    def teacher_output(self, ids: torch.Tensor) -> ModelOutput:
        if self.config.teacher_top_k is None:
            return self.teacher(ids, self.layers)
        if self.cache is None:
            raise SurgeryError("distill.teacher_top_k is set but no teacher cache is open: the training module calls "
                               "Distiller.attach_cache(train tokens, block size) when fitting starts; call it yourself outside one")
        return ModelOutput(topk=TopKTeacher(*self.cache.targets(ids, self._teacher_log_probs)))

    def _teacher_log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.teacher(ids).logits.float(), dim=-1)

    def __call__(self, student: nn.Module, ids: torch.Tensor, teacher_out: ModelOutput | None = None) -> DistillOutput:
        c = self.config
        out = run(student, ids, self.layers, chunked=c.chunk_size != 0)
        if self.teacher is not None and teacher_out is None:
            teacher_out = self.teacher_output(ids)
        target = None
        if c.kl_weight:
            target = teacher_out.topk or (LiveTeacher(teacher_out.final, teacher_out.head) if teacher_out.final is not None else None)
        if out.final is not None and (not c.kl_weight or target is not None):
            loss, ce, kl = chunked_lm_losses(out.final, out.head, ids, target, c.lm_weight, c.kl_weight, c.temperature,
                                             c.chunk_size)
            parts = {"ce": ce, "kl": kl} if c.kl_weight else {"ce": ce}
        else:  # the full logits: a head the chunked loss cannot take, or chunk_size 0
            loss, parts = self._full_logit_losses(out, ids, teacher_out)
        if c.hidden_weight:
            parts["hidden"] = hidden_alignment(out.hidden, teacher_out.hidden, c.hidden_loss)
            loss = loss + c.hidden_weight * parts["hidden"]
        return DistillOutput(loss, {k: v.detach() for k, v in parts.items()}, parts["ce"].detach(), teacher_out)

    def _full_logit_losses(self, out: ModelOutput, ids: torch.Tensor, teacher_out: ModelOutput | None):
        c = self.config
        logits = out.logits
        log_probs = F.log_softmax(logits.float(), dim=-1)  # shared by the CE and a KL at T = 1
        ce = next_token_ce(logits, ids, log_probs)
        parts, loss = {"ce": ce}, c.lm_weight * ce
        if c.kl_weight:
            if teacher_out.topk is not None:
                raise SurgeryError("a cached top-k teacher needs the chunked loss: set distill.chunk_size to null (automatic) or > 0")
            at_t = log_probs if c.temperature == 1 else None
            parts["kl"] = kl_to_teacher(logits, teacher_out.logits, c.temperature, at_t)
            loss = loss + c.kl_weight * parts["kl"]
        return loss, parts
