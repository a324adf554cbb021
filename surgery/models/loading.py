"""Load a causal LM (and its tokenizer) from a Hub name, a local directory or a Lightning checkpoint."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from surgery.errors import SurgeryError
from surgery.models.loss import causal_lm_loss
from surgery.models.shipped import is_shipped_path, resolve_shipped


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith(".ckpt")


def _hub_error(name: str, err: Exception) -> SurgeryError:
    return SurgeryError(
        f"could not load {name!r}: it is not a local path, and the Hugging Face Hub could not be "
        f"reached or has no such model ({type(err).__name__}). Without internet, pass a local "
        "directory saved with save_pretrained, e.g. checkpoints/tiny-gpt2-stdlib"
    )


def resolve(name: str) -> tuple[str, bool]:
    """(name or absolute path, is_local). Raises if it looks like a path that does not exist. A relative
    `checkpoints/...` path missing here is the copy shipped with surgery (`surgery.models.shipped`)."""
    name = resolve_shipped(name)
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
    if local:
        check_weight_files(Path(ref))
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, use_safetensors=True)
    except OSError as err:
        if local:
            raise SurgeryError(f"could not load the model in {name!r}: {err}") from err
        raise _hub_error(name, err) from err
    return causal_lm_loss(check_finite(model, name))


def check_finite(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Refuse a model with NaN or infinite weights (a diverged run, a bad conversion): nothing trained or measured
    from it would mean anything, and the failure would surface far away (a norm with no measured scale)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SurgeryError(
            f"model {name!r} has NaN or infinite weights in {', '.join(bad[:3])}{more}: it cannot be trained or "
            "evaluated. Load an earlier checkpoint of it, or the model it was trained from"
        )
    return model


PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "tf_model.h5", "flax_model.msgpack")


def check_weight_files(model_dir: Path) -> None:
    """Refuse a model directory whose weights are not all in intact safetensors files.

    Pickle-based weight files (`pytorch_model.bin`, ...) can run code when loaded, so they are never
    read; every `*.safetensors` file must have a well-formed header whose tensors fit in the file
    (a download or copy cut short fails here, with the file named, instead of deep inside loading).
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in model_dir.glob(pattern))
        found = f"only {', '.join(pickles)}, pickle-based files that can run code when loaded" if pickles else "no weight files"
        raise SurgeryError(
            f"model directory {str(model_dir)!r} has no *.safetensors weights ({found}); surgery loads weights only "
            "from safetensors. Convert a trusted copy once with `AutoModelForCausalLM.from_pretrained(dir, "
            "use_safetensors=False).save_pretrained(new_dir)` and pass new_dir"
        )
    for path in files:
        check_safetensors(path)


def check_safetensors(path: Path) -> dict:
    """Parse and check a safetensors header without reading the tensors; return the header.

    Layout: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets:
    [begin, end]}} (offsets relative to the data after the header), then the tensor data.
    """
    size = path.stat().st_size
    fix = "the file is truncated or corrupt: copy or download it again, or re-export the model"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SurgeryError(f"{str(path)!r} has {size} bytes, too few for a safetensors header; {fix}")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise SurgeryError(f"{str(path)!r}: its header claims {n} bytes but the file has {size}; {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as err:
            raise SurgeryError(f"{str(path)!r}: its safetensors header is not valid JSON ({err}); {fix}") from err
    if not isinstance(header, dict):
        raise SurgeryError(f"{str(path)!r}: its safetensors header is not a JSON object; {fix}")
    data = size - 8 - n
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        raise SurgeryError(f"{str(path)!r}: a tensor entry of its safetensors header has no data_offsets; {fix}")
    if ends and max(ends) > data:
        raise SurgeryError(f"{str(path)!r}: its tensors need {max(ends)} bytes of data but the file holds {data}; {fix}")
    return header


def checkpoint_tokenizer(path: str) -> str:
    """The tokenizer a run's `.ckpt` was trained with: the exported `<run>/model` beside `<run>/checkpoints/`, else the
    run's `data.tokenizer`, else its starting model (`init` / `source`), each as recorded (relative to where the run
    was started, or to the run directory). Raises SurgeryError naming what was tried."""
    ckpt = read_checkpoint(path)
    config = ((ckpt.get("callbacks") or {}).get("RunCheckpoint") or {}).get("config") or {}
    data = ((config.get("data") or {}).get("init_args") or {}) if isinstance(config.get("data"), dict) else {}
    hp = ckpt.get("hyper_parameters") or {}
    run_dir = Path(path).resolve().parent.parent
    candidates = [str(run_dir / "model"), ckpt.get("tokenizer_dir"), data.get("tokenizer"), hp.get("init"), hp.get("source")]
    tried = []
    for spec in dict.fromkeys(c for c in candidates if isinstance(c, str)):
        if spec.startswith("bpe-"):
            tried.append(f"{spec} (trained on the corpus; its copy is in <run>/model)")
            continue
        for ref in (spec, str(run_dir / spec)) if not Path(spec).is_absolute() else (spec,):
            try:
                ref = resolve_shipped(ref)
            except SurgeryError:
                continue
            if (Path(ref) / "tokenizer.json").is_file() or (Path(ref) / "tokenizer_config.json").is_file():
                return ref
        if not _looks_like_path(spec) and not is_shipped_path(spec) and not Path(spec).exists():
            return spec  # a Hub name
        tried.append(spec)
    raise SurgeryError(f"no tokenizer found for checkpoint {path!r} (tried: {', '.join(tried) or 'nothing recorded'}): "
                       "pass --tokenizer with the run's data.tokenizer (a directory or Hub name)")


def load_tokenizer(name: str):
    ref, local = resolve(name)
    if local and ref.endswith(".ckpt"):
        ref = checkpoint_tokenizer(ref)
    try:
        return AutoTokenizer.from_pretrained(ref)
    except OSError as err:
        if local:
            raise SurgeryError(f"no tokenizer in {name!r} (tokenizer.json expected): {err}") from err
        raise _hub_error(name, err) from err


def read_checkpoint(path: str | Path, weights_only: bool = True, use: str = "read",
                    fix: str = "Copy it again, or use an earlier checkpoint of the run") -> dict:
    """A Lightning checkpoint's contents (tensors memory-mapped, so a large file is not read twice): the one reader of
    `.ckpt` files. Raises SurgeryError naming the file, why it cannot be `use`d ("read", "resumed", ...) and `fix`,
    when it is missing, truncated or corrupt, or holds objects that `weights_only` loading refuses."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"checkpoint {str(path)!r} does not exist: check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as err:  # zip, pickle and storage errors all mean the file cannot be trusted
        text = str(err).splitlines()[0][:300]
        if "Weights only load failed" in str(err):
            raise SurgeryError(
                f"checkpoint {str(path)!r} holds Python objects that weights-only loading refuses ({text}); "
                "surgery's own checkpoints never do, and surgery reads only weights-only checkpoints. If you trust "
                "where the file came from, load it in Python with torch.load(weights_only=False) and save its tensors"
            ) from err
        raise SurgeryError(f"checkpoint {str(path)!r} is truncated or corrupt and cannot be {use} "
                           f"({type(err).__name__}: {text}). {fix}") from err


# The checkpoint key naming the function ("module:function") that gives a freshly built model the structure its
# LightningModule trained (e.g. LN removal's switchable norms), written by the module; the loader knows no surgery.
PREPARE_KEY = "prepare_model"


def prepare_function(spec: str):
    """The function a checkpoint's `prepare_model` entry names; only functions of the surgery package are imported."""
    module, _, name = spec.partition(":")
    if not module.startswith("surgery.") or not name:
        raise SurgeryError(f"checkpoint entry {PREPARE_KEY}={spec!r} does not name a function of the surgery package")
    return getattr(importlib.import_module(module), name)


def load_lightning_checkpoint(path: str) -> PreTrainedModel:
    """Rebuild the HF model a surgery module trained, from the config it stores in its checkpoint.

    Modules store `hf_config` (the model config as a dict) in every checkpoint, and in `prepare_model` the function
    that gives the rebuilt model the structure they trained (a model mid-way through LayerNorm removal comes back
    with its switchable LNs, fake or real, as saved; `surgery export` turns a finished one LN-free); weights live
    under the `model.` prefix of the state dict.
    """
    ckpt = read_checkpoint(path)
    if "hf_config" not in ckpt:
        raise SurgeryError(f"{path!r} is not a surgery checkpoint (no 'hf_config' entry)")
    cfg = AutoConfig.for_model(**ckpt["hf_config"])
    model = AutoModelForCausalLM.from_config(cfg)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if ckpt.get(PREPARE_KEY):
        prepare_function(ckpt[PREPARE_KEY])(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise SurgeryError(
            f"{path!r} does not match the model its config describes (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): it was written by a different version or module"
        )
    return causal_lm_loss(check_finite(model, path)).eval()


def _tied_keys(model: PreTrainedModel) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if not isinstance(tied, dict) else tied.keys())


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
