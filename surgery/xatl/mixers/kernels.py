"""Optional CUDA kernels (mamba-ssm, flash-linear-attention), looked up only on CUDA tensors.

Importing these packages on a CPU-only machine fails or, worse, makes `transformers` route through them,
so nothing here imports them unless the input lives on a GPU. A kernel whose call fails falls back to
the pure-PyTorch path with one warning (the kernels' signatures change between releases).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings

import torch


@functools.cache
def _load(module: str, name: str):
    if not torch.cuda.is_available():
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or built without CUDA
        return None


_TORCH_ONLY = False


@contextlib.contextmanager
def torch_paths_only():
    """Inside this block every mixer takes its pure-PyTorch path even on CUDA (to compare with the kernels)."""
    global _TORCH_ONLY
    before, _TORCH_ONLY = _TORCH_ONLY, True
    try:
        yield
    finally:
        _TORCH_ONLY = before


def cuda_kernel(x: torch.Tensor, module: str, name: str):
    """The kernel `module.name` if `x` is on CUDA and the import works, else None."""
    return _load(module, name) if x.is_cuda and not _TORCH_ONLY else None


def try_kernel(fn, *args, **kwargs):
    """Call `fn`; on failure warn once and return None so the caller takes its PyTorch path."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any kernel failure means: use the reference path
        warnings.warn(f"CUDA kernel {getattr(fn, '__name__', fn)} failed ({err}); using the PyTorch path", stacklevel=2)
        return None
