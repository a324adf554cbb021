"""Where caches live: $SURGERY_CACHE, else ~/.cache/surgery."""

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))
    path.mkdir(parents=True, exist_ok=True)
    return path
