"""pyproject.toml lists what surgery/ imports, and nothing else: every core dependency is imported by the package,
every third-party module the package imports is a declared dependency (core, or an extra for guarded imports)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# distribution name -> the module it installs, where the two differ
IMPORT_NAMES = {"pyyaml": "yaml", "flash-linear-attention": "fla", "mamba-ssm": "mamba_ssm",
                "causal-conv1d": "causal_conv1d", "lm-eval": "lm_eval"}


def module_of(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def third_party_imports() -> set[str]:
    found = set()
    for path in (ROOT / "surgery").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            found |= {n.split(".")[0] for n in names}
    return {m for m in found if m not in sys.stdlib_module_names and m != "surgery"}


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {module_of(r) for r in project["dependencies"]}
    extras = {module_of(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return core, extras


def test_every_core_dependency_is_imported_by_the_package():
    core, _ = declared()
    assert sorted(core - third_party_imports()) == []


def test_every_imported_module_is_declared():
    core, extras = declared()
    assert sorted(third_party_imports() - core - extras) == []
