"""The shipped tiny checkpoint in TransformerLens: real held-out code, real LayerNorms.

Tolerances as in test_lens.py: fp32 logits agree to ~2.6e-7 relative (measured), we allow 1e-6.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path

import torch
from lens_models import make_ln_free

from surgery.lens import has_normalization, load_hf, load_hooked
from surgery.lens.checks import dla_check, logit_agreement, verify_ln_free

CHECKPOINT = Path(os.environ.get("SURGERY_TINY_CHECKPOINT", Path(__file__).parents[1] / "checkpoints" / "tiny-gpt2-stdlib"))


def _code_tokens(tokenizer, n=128):
    text = inspect.getsource(inspect.getmodule(copy))  # held-out enough: any stdlib source reads like the corpus
    return torch.tensor(tokenizer(text)["input_ids"][: 2 * n]).reshape(2, n)


def test_checkpoint_in_transformer_lens():
    hf, tokenizer = load_hf(CHECKPOINT)
    hooked = load_hooked(CHECKPOINT)
    tokens = _code_tokens(tokenizer)
    agree = logit_agreement(hf, hooked, tokens)
    assert agree["hf_tl_max_abs_logit_diff"] < 1e-4 and agree["hf_tl_relative_logit_diff"] < 1e-6
    assert has_normalization(hooked)
    dla = dla_check(hooked, tokens)
    assert dla["dla_relative_error"] > 1e-2 and dla["dla_cached_scale_sum_error"] < 1e-5
    with torch.no_grad():  # the trained model predicts code: well below the uniform 8.3 nats
        logp = hooked(tokens)[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])
    assert -logp.mean().item() < 6.0  # measured 5.05 on copy.py (ln 4096 = 8.32)


def test_checkpoint_shape_made_ln_free():
    hf, tokenizer = load_hf(CHECKPOINT)
    result = verify_ln_free(make_ln_free(copy.deepcopy(hf)), _code_tokens(tokenizer))
    assert result["dla_relative_error"] < 1e-5 and result["n_components"] == 2 + 4 * 4 + 2 * 4
