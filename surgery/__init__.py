"""surgery: architecture surgery for transformer language models.

`import surgery` is cheap (no torch, no transformers). The model types surgeries make (XATL hybrids `hybrid_gpt2`,
`hybrid_gpt_neox`, `hybrid_llama`, ...; shared-depth twins `shared_gpt2`, ...) are registered with transformers' Auto
classes as soon as transformers itself is imported (at once, if it already is), so
`AutoModelForCausalLM.from_pretrained` loads a saved one after a plain `import surgery`, and no one who never touches
transformers pays for these classes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

HYBRIDS_MODULE = "surgery.xatl.hybrid.model"  # importing it registers the hybrid types with the Auto classes
# Each module that registers model types when imported, under the surgery package it belongs to.
REGISTERING_MODULES = {"surgery.xatl": HYBRIDS_MODULE, "surgery.share": "surgery.share.model"}


def register_hybrids(skip_packages: tuple[str, ...] = ()) -> None:
    """Register the hybrid and shared-depth model types with transformers' Auto classes (idempotent; imports torch
    and transformers). `skip_packages`: surgery packages being imported right now, which register their own."""
    for package, module in REGISTERING_MODULES.items():
        if package not in skip_packages:
            importlib.import_module(module)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs `register_hybrids` right after the `transformers` package has been executed, once."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # find the real spec below this finder, and never fire twice
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            # transformers imported on the way to a registering module: that module registers its own types
            importing = tuple(p for p in REGISTERING_MODULES if p in sys.modules)
            try:
                register_hybrids(importing)
            except Exception as err:  # a broken optional piece must not break `import transformers`
                warnings.warn(f"surgery could not register its hybrid model types with transformers: {err!r}",
                              stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    register_hybrids()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
