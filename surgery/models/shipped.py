"""Recipes and small models shipped with surgery, found from any directory and from an installed package.

A relative path that starts with `recipes/` or `checkpoints/` (as recipes and the README write them) is read
from the current directory when it exists there, else from the copy shipped with surgery: the source checkout
beside the `surgery` package (an editable install), or `surgery/_bundled/` inside an installed wheel (setup.py
copies every file under `recipes/` and `checkpoints/` there at build time, so new ones need no edit). The first
use of a shipped copy is printed on stderr; when neither place has the path, the error names both.
"""

from __future__ import annotations

import sys
from pathlib import Path

from surgery.errors import SurgeryError

SHIPPED_DIRS = ("recipes", "checkpoints")
_announced: set[str] = set()


def shipped_root() -> Path | None:
    """The directory holding the shipped `recipes/` and `checkpoints/`, or None when there is none."""
    package = Path(__file__).resolve().parents[1]  # surgery/, the package this module lives in
    bundled = package / "_bundled"
    if any((bundled / d).is_dir() for d in SHIPPED_DIRS):
        return bundled
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and any((checkout / d).is_dir() for d in SHIPPED_DIRS):
        return checkout
    return None


def is_shipped_path(name: str) -> bool:
    path = Path(name)
    return not path.is_absolute() and len(path.parts) > 1 and path.parts[0] in SHIPPED_DIRS


def resolve_shipped(name: str) -> str:
    """`name` itself when it exists (or is not a relative recipes/... or checkpoints/... path), else the shipped
    copy's absolute path. Raises SurgeryError naming both places when neither has it."""
    if not isinstance(name, str) or not is_shipped_path(name) or Path(name).exists():
        return name
    root = shipped_root()
    here = Path.cwd() / name
    if root is not None and root.resolve() != Path.cwd().resolve() and (root / name).exists():
        shipped = str((root / name).resolve())
        if name not in _announced:
            _announced.add(name)
            print(f"surgery: {name} is not in the current directory ({Path.cwd()}); using the copy shipped with "
                  f"surgery: {shipped}", file=sys.stderr, flush=True)
        return shipped
    where = str(root / name) if root is not None else "none: this installation ships no recipes or checkpoints"
    available = sorted(p.name for p in (root / Path(name).parts[0]).iterdir()) if root is not None and (
        root / Path(name).parts[0]).is_dir() else []
    listing = f" (shipped {Path(name).parts[0]}/: {', '.join(available)})" if available else ""
    raise SurgeryError(f"{name!r} exists neither in the current directory ({here}) nor among the files shipped with "
                       f"surgery ({where}){listing}: check the name, or pass an absolute path")
