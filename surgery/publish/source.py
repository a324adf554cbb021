"""What `surgery publish` publishes: a finished run directory, or a bare model directory.

A finished run (`trainer.default_root_dir` of `surgery fit`) holds `model/` (weights as safetensors and
`config.json`, written by `ExportRun` at the end of fit) and `metrics.json`; usually also the recipe as the
Lightning CLI saved it (`config.yaml` or `logs/config.yaml`) and, after `surgery verify --out <run>/verify`,
a verification report (`verify/report.json`). A bare model directory is anything `save_pretrained` wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from surgery.errors import SurgeryError

# Files of a model directory that a `from_pretrained` of the published repository needs; nothing else is copied.
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
)
RECIPE_NAMES = ("config.yaml", "logs/config.yaml")
VERIFY_FILES = ("report.json", "report.md", "dla_error_per_layer.png", "patching_scatter.png")


@dataclass
class PublishSource:
    """The files one publication is built from.

    model_dir: the `save_pretrained` directory. run_dir: the run it came from (None for a bare model).
    metrics: `metrics.json` of the run ({} for a bare model). recipe: the Lightning CLI config, parsed ({} if none).
    recipe_path / verify_dir: where those live, when present. parent_metrics: `metrics.json` one level up,
    when the run is an arm of a comparison (e.g. `xatl/` beside `scratch/` under an XATL compare directory).
    """

    model_dir: Path
    run_dir: Path | None = None
    metrics: dict = field(default_factory=dict)
    recipe_path: Path | None = None
    recipe: dict = field(default_factory=dict)
    verify_dir: Path | None = None
    parent_metrics: dict = field(default_factory=dict)

    @property
    def model_config(self) -> dict:
        return json.loads((self.model_dir / "config.json").read_text())

    def model_files(self) -> list[Path]:
        """The model directory's safetensors weights and the config / tokenizer files listed in MODEL_FILES."""
        weights = sorted(self.model_dir.glob("*.safetensors"))
        return weights + [self.model_dir / n for n in MODEL_FILES if (self.model_dir / n).is_file()]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SurgeryError(f"could not read {path}: {err}") from err
    if not isinstance(data, dict):
        raise SurgeryError(f"{path} does not hold a JSON object")
    return data


def _check_model_dir(model_dir: Path, what: str) -> None:
    if not (model_dir / "config.json").is_file():
        raise SurgeryError(f"{what}: {model_dir} has no config.json (not a directory written by save_pretrained)")
    if not list(model_dir.glob("*.safetensors")):
        extra = " (it has only .bin weights: re-save it with save_pretrained(..., safe_serialization=True))" if list(
            model_dir.glob("*.bin")) else ""
        raise SurgeryError(f"{what}: {model_dir} has no .safetensors weights{extra}; only safetensors are published")


def _looks_like_run(path: Path) -> bool:
    return any((path / p).exists() for p in ("model", "metrics.json", "checkpoints", "logs", "config.yaml"))


def find_source(path: str | Path, verify_dir: str | Path | None = None) -> PublishSource:
    """A PublishSource for a run directory, its `model/` subdirectory, or a bare model directory.

    Raises SurgeryError, naming what is missing, for anything else (a run still training, a typo).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SurgeryError(f"{str(path)!r} is not a directory: pass a finished run directory (with model/ and "
                           "metrics.json) or a model directory written by save_pretrained")
    if path.name == "model" and (path.parent / "metrics.json").is_file():
        path = path.parent  # the exported model of a run: publish the whole run
    if _looks_like_run(path) and not (path / "config.json").is_file():
        source = _run_source(path)
    elif (path / "config.json").is_file():
        _check_model_dir(path, "not a model directory")
        source = PublishSource(model_dir=path)
    else:
        raise SurgeryError(f"{str(path)!r} is neither a finished run (model/ and metrics.json) nor a model "
                           "directory (config.json and .safetensors weights)")
    if verify_dir is not None:
        verify_dir = Path(verify_dir)
        if not (verify_dir / "report.json").is_file():
            raise SurgeryError(f"--verify {verify_dir}: no report.json there (write one with `surgery verify MODEL --out DIR`)")
        source.verify_dir = verify_dir
    return source


def _run_source(run: Path) -> PublishSource:
    missing = [p for p in ("model/config.json", "metrics.json") if not (run / p).is_file()]
    if missing:
        raise SurgeryError(
            f"{run} is not a finished run: {' and '.join(missing)} missing. `surgery fit` writes model/ and "
            "metrics.json when training ends (ExportRun); finish or resume the run (--ckpt_path last) first")
    _check_model_dir(run / "model", f"{run} is not a finished run")
    source = PublishSource(model_dir=run / "model", run_dir=run, metrics=_read_json(run / "metrics.json"))
    for name in RECIPE_NAMES:
        if (run / name).is_file():
            source.recipe_path = run / name
            source.recipe = yaml.safe_load(source.recipe_path.read_text()) or {}
            break
    if (run / "verify" / "report.json").is_file():
        source.verify_dir = run / "verify"
    if (run.parent / "metrics.json").is_file():
        source.parent_metrics = _read_json(run.parent / "metrics.json")
    return source
