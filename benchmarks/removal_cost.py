"""Norm-removal training step vs plain fine-tuning of the same model with its norms (any supported family).

Both sides run the same full step on the same batch: forward, loss, backward, gradient clipping (1.0),
AdamW step. The removal side is `LNRemoval.training_step`'s work without Lightning: end-of-text mask set
on the token context, LM loss plus 0.1 x the std-uniformity loss at ln_f's input, on a model prepared by
`prepare_for_removal`. Phases (each timed interleaved with the plain step):

- before: every SwitchableLayerNorm real (these also update their moving averages in training mode);
- during: the first half of the points in removal order fake (all ln_2, then ln_1_qk block by block),
  the rest real: split Q/K and V inputs with one path fake and one real;
- after: every point fake.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedModel

from benchmarks.measure import interleaved, paired_ratio, profile_pair
from benchmarks.report import progress_line
from surgery.families import blocks
from surgery.remove_ln.module import std_uniformity_loss
from surgery.remove_ln.points import BASE_KINDS, point_names, prepare_for_removal, token_context

PHASES = ("before", "during", "after")
TARGET = 1.05
REPO = Path(__file__).resolve().parents[1]


# random models of real shapes (no download): GPT-2 small, Pythia-160m, SmolLM2-135M
SHAPES = {
    "gpt2-small": lambda: GPT2Config(),
    "pythia-160m": lambda: GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072, vocab_size=50304, rotary_pct=0.25,
                                         use_parallel_residual=True, tie_word_embeddings=False),
    "smollm2-135m": lambda: LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                        num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                        tie_word_embeddings=True),
}


def build_model(name: str, seed: int = 0) -> PreTrainedModel:
    """A shipped checkpoint by name ("tiny-gpt2-stdlib", "tiny-pythia-stdlib", "tiny-llama-stdlib"), a random
    model of a real shape (`SHAPES`), or a directory / .ckpt for `load_causal_lm`."""
    torch.manual_seed(seed)
    if name in SHAPES:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(SHAPES[name]())
    from surgery.models.loading import load_causal_lm

    shipped = REPO / "checkpoints" / name
    return load_causal_lm(str(shipped if shipped.is_dir() else name))


class Stepper:
    """One full training step on a fixed batch (B, T). `removal` adds the removal module's extra work."""

    def __init__(self, model, batch: torch.Tensor, eos: int, points=None, aux_weight: float = 0.1):
        self.model, self.batch, self.eos, self.points, self.aux_weight = model.train(), batch, eos, points, aux_weight
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
        self.ln_f_input = None
        if points:
            points["ln_f"].register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.ln_f_input = args[0]

    def __call__(self) -> float:
        batch = self.batch
        self.opt.zero_grad(set_to_none=True)
        if self.points:
            token_context(self.points).eot_mask = batch == self.eos
        loss = self.model(batch, labels=batch).loss
        if self.points:
            token_context(self.points).flush()
        if self.points and self.aux_weight > 0:
            keep = batch != self.eos
            keep[:, 0] = False
            loss = loss + self.aux_weight * std_uniformity_loss(self.ln_f_input, keep, self.points["ln_f"].eps)
            self.ln_f_input = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())


def removal_order(n_blocks: int) -> list[str]:
    names = point_names(n_blocks)
    return [n for k in BASE_KINDS for n in names[k]]


def set_phase(points: dict, phase: str, n_blocks: int) -> list[str]:
    """Make the points fake for `phase` (phases only move forward). Returns the names now fake."""
    order = removal_order(n_blocks)
    fake = {"before": [], "during": order[: len(order) // 2], "after": order}[phase]
    for name in fake:
        if not points[name].is_fake:
            points[name].go_fake()
    return fake


def run(model_name: str, batch: int, seq: int, repeats: int, warmup: int = 1, phases=PHASES,
        profile: bool = True, profile_rounds: int = 3, model: PreTrainedModel | None = None, verbose: bool = False) -> dict:
    """Time plain vs removal steps at each phase. Returns {"model", "params", "batch", "seq", "rows": [...],
    "profile": {...} (only for phases above TARGET), "removal_model": the prepared model (all fake at the end)}."""
    plain_model = model if model is not None else build_model(model_name)
    removal_model = copy.deepcopy(plain_model)
    points = prepare_for_removal(removal_model)
    cfg = plain_model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    ids[:, seq // 2] = eos  # one document boundary per row, as in packed training blocks
    plain = Stepper(plain_model, ids, eos)
    removal = Stepper(removal_model, ids, eos, points)
    with torch.no_grad():  # moving averages measured, so that any point can go fake
        removal_model(ids)
    n_blocks = len(blocks(removal_model))
    rows, prof = [], {}
    for phase in phases:
        fake = set_phase(points, phase, n_blocks)
        t = interleaved({"plain": plain, "removal": removal}, repeats, warmup)
        tokens = batch * seq
        row = {"model": model_name, "phase": phase, "fake_points": len(fake), "points": len(points),
               "plain_s": t["plain"]["median_s"], "removal_s": t["removal"]["median_s"],
               "ratio": paired_ratio(t, "removal", "plain"), "ratio_cpu": paired_ratio(t, "removal", "plain", "cpu_times"),
               "plain_tok_s": tokens / t["plain"]["median_s"], "removal_tok_s": tokens / t["removal"]["median_s"],
               "plain_peak_mib": t["plain"]["peak_mib"], "removal_peak_mib": t["removal"]["peak_mib"],
               "repeats": repeats, "plain_times": t["plain"]["times"], "removal_times": t["removal"]["times"],
               "plain_cpu_times": t["plain"]["cpu_times"], "removal_cpu_times": t["removal"]["cpu_times"]}
        rows.append(row)
        if verbose:
            print(progress_line(row), flush=True)
        if profile and max(row["ratio"], row["ratio_cpu"]) > TARGET:
            prof[phase] = profile_pair(plain, removal, rounds=profile_rounds)
    return {"model": model_name, "params": sum(p.numel() for p in plain_model.parameters()), "batch": batch,
            "seq": seq, "rows": rows, "profile": prof, "removal_model": removal_model}
