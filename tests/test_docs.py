"""The README and the docs say true things about the tree: links resolve, dotted names exist, the README is short."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOTTED = re.compile(r"(?<![\w./-])surgery(?:\.[A-Za-z_]\w*)+")


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert missing == []


def resolves(dotted: str) -> bool:
    """Whether `surgery.a.b.c` is a module, or an attribute reached from the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_dotted_name_in_the_readme_docs_recipes_and_benchmark_notes_exists():
    texts = [*PAGES, *sorted((ROOT / "recipes").rglob("*.yaml")), *sorted((ROOT / "benchmarks").glob("*.md"))]
    names = sorted({n.rstrip(".") for page in texts for n in DOTTED.findall(page.read_text())})
    assert len(names) > 20  # the pattern finds the names the pages use
    assert [n for n in names if not resolves(n)] == []
