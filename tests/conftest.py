"""Shared test setup.

- One torch thread for every test: the tiny models gain nothing from more, and on a shared 2-core machine more
  threads only contend.
- The helper modules beside this file are imported by plain name (`from xatl_models import source_and_hybrid`);
  subprocesses started by the tests get this folder on PYTHONPATH the same way (`reliability_setup`). The tiny
  random GPT-2 every suite starts from is `tiny_models.tiny_gpt2`; each surgery's helpers (`remove_ln_models`,
  `lens_models`, `ln_tune_models`, `xatl_models`, `publish_runs`, `hub_standin`) build on it.
- Shared fixtures: `tiny_lm_dir` (a saved tiny GPT-2 with its tokenizer).
- `pytest -m "not slow"` is the fast tier: `slow` marks end-to-end recipe runs and tests that start a fresh
  Python importing torch.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny GPT-2 (tiny_models) with a 300-entry BPE tokenizer trained on the standard library's json package:
    a model directory that LN-tuning recipes can start from."""
    from surgery.data.tokenizer import get_tokenizer
    from surgery.ln_tune.lm import StdlibPartCorpus
    from tiny_models import tiny_gpt2

    path = tmp_path_factory.mktemp("tiny_lm")
    tok = get_tokenizer("bpe-300", StdlibPartCorpus("stdlib:json", part="json"))
    tiny_gpt2(vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path
