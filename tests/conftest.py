"""Shared test setup.

- One torch thread for every test: the tiny models gain nothing from more, and on a shared 2-core machine more
  threads only contend.
- The helper modules beside this file are imported by plain name (`from xatl_models import source_and_hybrid`);
  subprocesses started by the tests get this folder on PYTHONPATH the same way (`reliability_setup`). The tiny
  random GPT-2 every suite starts from is `tiny_models.tiny_gpt2`; each surgery's helpers (`remove_ln_models`,
  `lens_models`, `ln_tune_models`, `xatl_models`, `publish_runs`, `hub_standin`) build on it.
- `pytest -m "not slow"` is the fast tier: `slow` marks end-to-end recipe runs and tests that start a fresh
  Python importing torch.
"""

import torch

torch.set_num_threads(1)
