"""LN-tuning a causal LM with Lightning: `LNTuneLM` (a `CausalLM` that trains only norm entries)
and `StdlibPart` (token blocks of one package of the standard library, e.g. `email`), so a model
pretrained on the whole standard library can be adapted to one part of it.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.data.corpus import Corpus
from surgery.data.datamodule import TokenBlocks
from surgery.errors import SurgeryError
from surgery.eval.loss import cross_entropy
from surgery.families import context_length_of
from surgery.ln_tune.fisher import fisher_scores, next_token_log_likelihood
from surgery.ln_tune.adapter import save_adapter
from surgery.ln_tune.combine import init_prefix
from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.methods import optimizer_groups, prepare
from surgery.ln_tune.params import ln_parameters, norm_modules
from surgery.ln_tune.tune import LNTuneConfig, export, ln_tune, trainable_parameters
from surgery.training.lm import CausalLM
from surgery.training.report import Row, count_row, gap_rows, num, print_results


LN_METHODS = ("ln", "ln-attn")  # LN-tuning proper: every norm, or those feeding attention; `selection` applies
LM_BASELINES = ("full", "bitfit", "lora", "lora-mlp", "prefix", "ln+lora", "ln+lora-mlp", "ln+prefix")


@dataclass(frozen=True)
class StdlibPartCorpus(Corpus):
    """The .py files under one directory of the standard library. Files are split by the same hash of
    their path relative to the standard library as the whole-stdlib corpus, so with the same
    `val_fraction` the held-out files are the ones pretraining held out."""

    part: str = "email"

    def files(self) -> list[Path]:
        path = self.root() / self.part
        if not path.is_dir():
            raise SurgeryError(f"the standard library has no directory {self.part!r} (looked in {self.root()})")
        return sorted(path.rglob("*.py"))

    def root(self) -> Path:
        return Path(sysconfig.get_paths()["stdlib"])


class StdlibPart(TokenBlocks):
    """`TokenBlocks` of one standard-library package. Args as `TokenBlocks`, plus `part` (e.g. "email")."""

    def __init__(self, part: str = "email", tokenizer: str = "checkpoints/tiny-gpt2-stdlib", block_size: int = 256,
                 batch_size: int = 8, val_fraction: float = 0.2, max_val_blocks: int | None = None,
                 seed: int | None = None):
        super().__init__("stdlib", tokenizer, block_size, batch_size, val_fraction, max_val_blocks, seed=seed)
        self.corpus = StdlibPartCorpus(f"stdlib:{part}", val_fraction, part=part)
        self.corpus.files()


class LNTuneLM(CausalLM):
    """Trains only the norm gains and biases of a pretrained causal LM: GPT-2 and GPT-NeoX/Pythia LayerNorm
    gains and biases, Llama-style RMSNorm gains (it has no bias). Embeddings and the unembedding, tied or
    not, stay frozen. The baselines and combinations LN-tuning is compared with train here too (`method`).

    Args:
        init: the pretrained model (directory, Hub name or .ckpt).
        method: "ln" (every norm), "ln-attn" (the norms feeding attention), or one of `LM_BASELINES`
            (`surgery.ln_tune.methods`: full, bitfit, lora, lora-mlp, prefix, ln+lora, ln+lora-mlp, ln+prefix).
        selection: for ln / ln-attn, "all" their entries, "fisher" (top `fraction` by empirical Fisher on
            `fisher_samples` training blocks), "random" (`fraction` drawn with `seed`) or "mask" (the file `mask`).
        lora_r, lora_alpha: LoRA rank and scale. prefix_tokens: prefix-tuning's virtual tokens per layer.
        norm_lr: peak learning rate of the norms where it differs from `lr` (an ln+ combination); None: `lr`.
        save_adapter: also write the run as a PEFT adapter to `<run_dir>/adapter` (`surgery.ln_tune.adapter`);
            the merged plain model goes to `<run_dir>/model` as ever (prefix-tuning: the adapter there too).
        weight_decay: AdamW decay on every trainable entry (entries outside the mask never move).
        lr etc.: as `CausalLM`; LN-tuning wants 1e-3..1e-2.
    The mask in force is saved to `<run_dir>/masks.safetensors` at the start of fit.
    """

    def __init__(self, init: str, method: str = "ln", selection: str = "all", fraction: float = 0.1,
                 mask: str | None = None, fisher_samples: int = 32, seed: int = 0, lr: float = 3e-3,
                 min_lr_ratio: float = 0.1, warmup_steps: int = 20, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), lora_r: int = 8, lora_alpha: int = 16,
                 prefix_tokens: int = 8, norm_lr: float | None = None, save_adapter: bool = True,
                 tokenizer: Any = None):
        if method not in LN_METHODS + LM_BASELINES:
            raise SurgeryError(f"unknown method {method!r} for a causal LM; choose from "
                               f"{', '.join(LN_METHODS + LM_BASELINES)}")
        if selection not in ("all", "fisher", "random", "mask"):
            raise SurgeryError(f"selection must be all, fisher, random or mask, got {selection!r}")
        if selection != "all" and method not in LN_METHODS:
            raise SurgeryError(f"selection {selection!r} picks norm entries, but method {method!r} trains no norm "
                               "subset: use selection all, or method ln / ln-attn")
        if selection == "mask" and not mask:
            raise SurgeryError("selection 'mask' needs model.init_args.mask: the masks.safetensors of an earlier run")
        super().__init__(init=init, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, betas=betas, tokenizer=tokenizer)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.norms = "attn" if method == "ln-attn" else "all"
        self.mask: EntryMask | None = None
        if method in LN_METHODS:
            self.mask = ln_tune(self.model, LNTuneConfig(head=None, norms=self.norms))
        else:
            self.model, _ = prepare(self.model, method, head=None, lora_r=lora_r, lora_alpha=lora_alpha,
                                    prefix_tokens=prefix_tokens)
        self.val_before: dict | None = None
        self.trainable = trainable_parameters(self.model, self.mask)
        self._prepared = False

    def setup(self, stage: str) -> None:
        if stage != "fit" or self._prepared:
            return
        self._prepared = True
        hp, dm = self.hparams, self.trainer.datamodule
        context = context_length_of(self.model.config)
        if hp.method.endswith("prefix") and context and dm.block_size + hp.prefix_tokens > context:
            raise SurgeryError(f"prefix-tuning adds {hp.prefix_tokens} positions: blocks of {dm.block_size} tokens "
                               f"would need {dm.block_size + hp.prefix_tokens}, the model has {context}; set "
                               f"data.init_args.block_size to {context - hp.prefix_tokens} or less")
        if hp.method.endswith("prefix"):  # the prefix starts as the first tokens of the first training block
            init_prefix(self.model, dm.split("train")[0][: hp.prefix_tokens].to(self.device))
        if self.mask is not None:
            own = ln_parameters(self.model, norms=self.norms)
            if hp.selection == "fisher":
                blocks = [dm.split("train")[i] for i in range(min(hp.fisher_samples, len(dm.split("train"))))]
                scores = fisher_scores(self.model, [torch.stack(blocks[i : i + 8]) for i in range(0, len(blocks), 8)],
                                       next_token_log_likelihood)
                mask = EntryMask.top_k({n: s for n, s in scores.items() if n in own}, fraction=hp.fraction)
            elif hp.selection == "random":
                mask = EntryMask.random({n: p.shape for n, p in own.items()}, hp.fraction, seed=hp.seed)
            elif hp.selection == "mask":
                mask = EntryMask.load(hp.mask)
            else:
                mask = self.mask
            self.mask = ln_tune(self.model, LNTuneConfig(head=None, mask=mask, norms=self.norms))
            self.mask.save(Path(self.trainer.default_root_dir) / "masks.safetensors")
            self.trainable = trainable_parameters(self.model, self.mask)
        self.val_before = cross_entropy(self.model, dm.split("validation"), dm.batch_size)

    def lm_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """A PEFT method runs through its wrapper's forward (the prefix and the LoRA paths live there), with the model's
        own next-token loss (mean cross-entropy, nats/token); every other method as `CausalLM` does."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            return self.model(input_ids=batch, labels=batch).loss
        return super().lm_loss(batch)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(optimizer_groups(self.model, hp.lr, hp.norm_lr), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        from surgery.training.lm import cosine_with_warmup

        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_with_warmup(s, hp.warmup_steps, int(total), hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.mask is not None:
            self.mask.restore(self.model)

    def export_model(self):
        if self.mask is not None:
            self.mask.remove_hooks()
        if self.hparams.save_adapter and self._trainer is not None and self.hparams.method != "full":
            save_adapter(self.model, Path(self.trainer.default_root_dir) / "adapter", norms=self.norms,
                         mask=self.mask, head=None)
        return export(self.model)

    def run_metrics(self, exported, val: dict) -> dict:
        """The LN-tuning part of metrics.json: the selection, the trainable entries, the validation loss before
        tuning (`val_before`, with its token count) and `gap_vs_before` (loss after - before, nats/token; negative:
        tuning helped); printed as the results table (`result_rows`) as well."""
        norms = sorted({type(m).__name__ for m in norm_modules(exported).values()})
        before = self.val_before
        out = {"ln_tune": {"method": self.hparams.method, "selection": self.hparams.selection,
                           "trainable": self.trainable, "norms": norms,
                           "ln_entries": self.mask.total() if self.mask is not None else None, "val_before": before,
                           "gap_vs_before": None if before is None else val["loss"] - before["loss"]}}
        print_results("LN-tuning: results", result_rows({"val": val, **out}))
        return out


def result_rows(metrics: dict) -> list[Row]:
    """The LN-tuning rows of the end-of-run table and the model card, from metrics.json: the gap to the model
    before tuning first, the validation loss before and after with the tokens behind each, the trainable entries."""
    tune, val = metrics["ln_tune"], metrics.get("val") or {}
    before = tune.get("val_before") or {}
    gap = tune.get("gap_vs_before")
    if gap is None and "loss" in before and "loss" in val:  # an older run: the gap from its two losses
        gap = val["loss"] - before["loss"]
    rows = gap_rows({"gap_vs_original": gap}, "tuned", "before tuning")
    if "loss" in before:
        rows.append(("validation loss before tuning (nats/token)", num(before["loss"])))
    if "loss" in val:
        rows.append(("validation loss (nats/token)", num(val["loss"])))
    rows += count_row({"before tuning": before.get("tokens"), "after": val.get("tokens")})
    if tune.get("ln_entries") is None:  # a baseline or combination: no LN entry subset
        rows.append((f"trainable parameters ({tune.get('method')})", num(tune.get("trainable"))))
    else:
        method = tune.get("method", "ln")
        which = tune.get("selection") if method == "ln" else f"{method}, {tune.get('selection')}"
        rows.append((f"trainable LayerNorm entries ({which})", f"{num(tune.get('trainable'))} of {num(tune.get('ln_entries'))}"))
    return rows
