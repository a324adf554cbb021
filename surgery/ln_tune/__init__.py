"""LN-tuning: fine-tune only norm gains and biases (RMSNorm: gains), all of them, those feeding attention, or a
Fisher-selected subset of their entries; alone or combined with LoRA and prefix-tuning; saved as plain models or PEFT
adapters."""

from surgery.ln_tune.adapter import save_adapter
from surgery.ln_tune.fisher import fisher_scores, label_log_likelihood, next_token_log_likelihood
from surgery.ln_tune.mask import EntryMask
from surgery.ln_tune.params import bias_parameters, head_parameters, ln_parameters, norm_modules
from surgery.ln_tune.tune import LNTuneConfig, export, ln_tune, peft_ln_tuning, trainable_parameters

__all__ = [
    "EntryMask",
    "LNTuneConfig",
    "bias_parameters",
    "export",
    "fisher_scores",
    "head_parameters",
    "label_log_likelihood",
    "ln_parameters",
    "ln_tune",
    "next_token_log_likelihood",
    "norm_modules",
    "peft_ln_tuning",
    "save_adapter",
    "trainable_parameters",
]
