"""Load a causal LM (and its tokenizer) from a Hub name, a local directory or a Lightning checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from surgery.errors import SurgeryError
import surgery.xatl  # noqa: F401,E402  registers the hybrid_gpt2 model type with the Auto classes


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith(".ckpt")


def _hub_error(name: str, err: Exception) -> SurgeryError:
    return SurgeryError(
        f"could not load {name!r}: it is not a local path, and the Hugging Face Hub could not be "
        f"reached or has no such model ({type(err).__name__}). Without internet, pass a local "
        "directory saved with save_pretrained, e.g. checkpoints/tiny-gpt2-stdlib"
    )


def resolve(name: str) -> tuple[str, bool]:
    """(name or absolute path, is_local). Raises if it looks like a path that does not exist."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve()), True
    if _looks_like_path(name):
        raise SurgeryError(f"model path {name!r} does not exist; check the path or pass a Hub name such as 'gpt2'")
    return name, False


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A `transformers` causal LM from a Hub name, a `save_pretrained` directory or a Lightning `.ckpt`."""
    ref, local = resolve(name)
    if local and ref.endswith(".ckpt"):
        return load_lightning_checkpoint(ref)
    if local and not (Path(ref) / "config.json").exists():
        raise SurgeryError(f"{name!r} has no config.json: it is not a directory written by save_pretrained")
    try:
        return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, use_safetensors=True)
    except OSError as err:
        if local:
            raise SurgeryError(f"could not load the model in {name!r}: {err}") from err
        raise _hub_error(name, err) from err


def load_tokenizer(name: str):
    ref, local = resolve(name)
    if local and ref.endswith(".ckpt"):
        ckpt = _read_checkpoint(ref)
        ref = ckpt.get("tokenizer_dir") or ref
    try:
        return AutoTokenizer.from_pretrained(ref)
    except OSError as err:
        if local:
            raise SurgeryError(f"no tokenizer in {name!r} (tokenizer.json expected): {err}") from err
        raise _hub_error(name, err) from err


def _read_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or truncated files
        raise SurgeryError(f"could not read Lightning checkpoint {path!r}: {err}") from err


def load_lightning_checkpoint(path: str) -> PreTrainedModel:
    """Rebuild the HF model a surgery module trained, from the config it stores in its checkpoint.

    Modules store `hf_config` (the model config as a dict) in every checkpoint; weights live under
    the `model.` prefix of the state dict.
    """
    ckpt = _read_checkpoint(path)
    if "hf_config" not in ckpt:
        raise SurgeryError(f"{path!r} is not a surgery checkpoint (no 'hf_config' entry)")
    cfg = AutoConfig.for_model(**ckpt["hf_config"])
    model = AutoModelForCausalLM.from_config(cfg)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=False)
    return model


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
