"""Assemble the folder `surgery publish` uploads, check it, and upload it.

Layout of the folder (exactly what reaches the Hub):

    README.md                 model card (Hub metadata, results tables, reload check, loading snippets)
    config.json, generation_config.json, *.safetensors[, model.safetensors.index.json]
    tokenizer.json, tokenizer_config.json, ...   (the tokenizer files present in the model directory)
    recipe.yaml               the run's Lightning CLI config (when the run saved one)
    metrics.json              the run's measurements (runs only)
    verify/report.json, verify/report.md, verify/*.png   (when the run has a `surgery verify` report)
    plots/*.png               plots listed in metrics.json (when present)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.publish import card
from surgery.publish.check import auto_class, check_folder, needs_surgery
from surgery.publish.hub import check_repo_id, resolve_token, upload
from surgery.publish.source import VERIFY_FILES, PublishSource, find_source


def _marked_ln_free(config: dict) -> bool:
    from types import SimpleNamespace

    from surgery.remove_ln.export import marked_ln_free

    return marked_ln_free(SimpleNamespace(surgery_ln_free=config.get("surgery_ln_free")))


def _copy(src: Path, folder: Path, name: str, files: list[str]) -> None:
    dst = folder / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    files.append(name)


def copy_files(source: PublishSource, folder: Path) -> list[str]:
    """Copy everything but the card into `folder`; returns the paths written, relative to `folder`."""
    files: list[str] = []
    for path in source.model_files():
        _copy(path, folder, path.name, files)
    if source.recipe_path is not None:
        _copy(source.recipe_path, folder, "recipe.yaml", files)
    if source.run_dir is not None:
        _copy(source.run_dir / "metrics.json", folder, "metrics.json", files)
        for plot in source.metrics.get("plots") or []:
            path = source.run_dir / Path(plot).name
            if path.suffix == ".png" and path.is_file():
                _copy(path, folder, f"plots/{path.name}", files)
    if source.verify_dir is not None:
        for name in VERIFY_FILES:
            if (source.verify_dir / name).is_file():
                _copy(source.verify_dir / name, folder, f"verify/{name}", files)
    return files


def assemble_folder(source: PublishSource, folder: Path, repo_id: str, license: str = "mit", base_model: str | None = None,
             datasets: list[str] | None = None) -> dict:
    """Write the publication of `source` into the empty directory `folder` and check that it reloads.

    Returns {"folder", "files", "metadata", "checks"}. Raises SurgeryError when the reload check fails.
    """
    config = source.model_config
    files = copy_files(source, folder)
    checks = check_folder(folder, source.model_dir, config)
    meta = card.metadata(source, _marked_ln_free(config), license, base_model or card.base_model(source),
                         datasets if datasets is not None else card.datasets(source))
    files.append("README.md")
    text = card.render(source, repo_id, meta, checks, files, auto_class(config), needs_surgery(config))
    (folder / "README.md").write_text(text)
    return {"folder": str(folder), "files": sorted(files), "metadata": meta, "checks": checks}


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SurgeryError(f"--dry-run {out}: the directory exists and is not empty; pass a new directory (or delete it)")
    out.mkdir(parents=True, exist_ok=True)


def publish(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
            dry_run: str | Path | None = None, license: str = "mit", verify: str | Path | None = None,
            base_model: str | None = None, datasets: list[str] | None = None) -> dict:
    """Assemble, check and (unless `dry_run`, a directory to write the folder to) upload a run or model directory.

    Order: repo id and token first (cheap failures), then the source, the folder, the reload check, the upload.
    After an upload, `<run>/published.json` records the repository and commit; nothing is recorded otherwise.
    """
    check_repo_id(repo_id)
    token = None if dry_run is not None else resolve_token()
    source = find_source(path, verify)
    if dry_run is not None:
        out = Path(dry_run)
        _prepare_out(out)
        try:
            result = assemble_folder(source, out, repo_id, license, base_model, datasets)
        except Exception:
            shutil.rmtree(out, ignore_errors=True)  # a folder that failed its check is not left looking publishable
            raise
        result["uploaded"] = False
        return result
    with tempfile.TemporaryDirectory(prefix="surgery-publish-") as tmp:
        result = assemble_folder(source, Path(tmp), repo_id, license, base_model, datasets)
        result.update(upload(Path(tmp), repo_id, token, private=private, revision=revision), uploaded=True, folder=None)
    if source.run_dir is not None:
        record = {k: result[k] for k in ("repo_url", "commit_url", "commit", "revision", "files")}
        record["published_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (source.run_dir / "published.json").write_text(json.dumps({"repo_id": repo_id, **record}, indent=2) + "\n")
    return result
