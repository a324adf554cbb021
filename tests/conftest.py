"""Shared test setup: one torch thread for every test (the tiny models gain nothing from more, and on a shared
2-core machine more threads only contend), and the helper modules beside this file (`remove_ln_models`,
`lens_models`, `ln_tune_models`, `xatl_models`, `reliability_setup`, `publish_runs`, `hub_standin`), imported by
plain name: `from xatl_models import source_and_hybrid`. Subprocesses started by the tests get this folder on
PYTHONPATH the same way (`reliability_setup.fit_subprocess`)."""

import torch

torch.set_num_threads(1)
