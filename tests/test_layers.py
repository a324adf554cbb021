"""The package's layering: imports run one way, from the surgeries down to the foundations.

Every `import` and `from ... import` in surgery/ (at module level or inside a function) is read from the source;
a module may import its own layer or a lower one, never a higher one, and the surgeries never import each
other. Nothing in the package changes `sys.path` or imports the `benchmarks` folder.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "surgery"

# bottom up; packages on one row are one layer and do not import each other
LAYERS = [
    ["surgery.errors"],
    ["surgery.families"],
    ["surgery.models"],
    ["surgery.data"],
    ["surgery.eval"],
    ["surgery.training"],
    ["surgery.lens"],
    ["surgery.remove_ln", "surgery.xatl", "surgery.ln_tune", "surgery.share"],
    ["surgery.publish"],
    ["surgery.cli"],
]
ROOT_MODULES = {"__init__.py", "errors.py", "families.py"}


def unit_of(module: str) -> str | None:
    """The layer unit (a row entry of LAYERS) a dotted module name belongs to; None for the package's face."""
    for row in LAYERS:
        for unit in row:
            if module == unit or module.startswith(unit + "."):
                return unit
    return None


def rank(unit: str) -> int:
    return next(i for i, row in enumerate(LAYERS) if unit in row)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}" if base == "surgery" else base) for alias in node.names]
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source_unit = unit_of(module_name(path))
        text = path.read_text()
        if "sys.path" in text:
            found.append(f"{path.relative_to(PACKAGE.parent)} touches sys.path")
        for line, target in imported(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if target == "benchmarks" or target.startswith("benchmarks."):
                found.append(f"{where} (benchmarks/ is not part of the package)")
            if source_unit is None or not target.startswith("surgery"):
                continue
            target_unit = unit_of(target)
            if target_unit is None or target_unit == source_unit:
                continue
            if rank(target_unit) > rank(source_unit):
                found.append(f"{where}: upward, from layer {source_unit} to {target_unit}")
            elif rank(target_unit) == rank(source_unit):
                found.append(f"{where}: sideways, between {source_unit} and {target_unit}")
    return found


def test_no_module_imports_upward_or_touches_sys_path():
    assert violations() == []


def test_every_module_belongs_to_a_layer():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_MODULES)
    assert loose == [], f"modules at the package root outside the layers: {loose}"
    packages = sorted(f"surgery.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert [p for p in packages if unit_of(p) is None] == []


def test_every_package_says_what_belongs_there():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("__init__.py"))
               if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


@pytest.mark.parametrize("source, expected", [
    ("from surgery.xatl.hybrid.model import hybrid_model\n", "upward, from layer surgery.models to surgery.xatl"),
    ("def f():\n    from surgery.cli.entry import main\n", "upward, from layer surgery.models to surgery.cli"),
    ("import sys\nsys.path.insert(0, '.')\n", "touches sys.path"),
    ("from ..remove_ln import points\n", "upward, from layer surgery.models to surgery.remove_ln"),
])
def test_the_check_finds_an_upward_import(tmp_path, monkeypatch, source, expected):
    """The walker is not vacuous: a file planted in a lower layer with an upward import is reported."""
    planted = PACKAGE / "models" / "_planted_for_test.py"
    planted.write_text(source)
    try:
        assert any(expected in v for v in violations())
    finally:
        planted.unlink()


def test_sideways_imports_between_surgeries_are_reported():
    planted = PACKAGE / "ln_tune" / "_planted_for_test.py"
    planted.write_text("from surgery.remove_ln.points import find_points\n")
    try:
        assert any("sideways, between surgery.ln_tune and surgery.remove_ln" in v for v in violations())
    finally:
        planted.unlink()


def test_import_surgery_and_the_help_load_neither_torch_nor_transformers():
    code = ("import sys, surgery, surgery.cli; surgery.cli.main(['--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


SLOW = pytest.mark.slow  # a fresh process importing torch and transformers: seconds each


@pytest.mark.parametrize("imports", [pytest.param("import surgery; import transformers", marks=SLOW),
                                     pytest.param("import surgery.xatl", marks=SLOW),
                                     pytest.param("import transformers; import surgery", marks=SLOW),
                                     pytest.param("import surgery.models.loading", marks=SLOW),
                                     pytest.param("import surgery.lens", marks=SLOW)])
def test_hybrids_register_with_transformers_after_import_surgery(imports):
    """`import surgery` is enough for the Auto classes to know the hybrid types, whichever is imported first, and
    whichever of the package's modules brings transformers in (with no warning: -W error)."""
    code = (f"{imports}; from transformers import AutoConfig, AutoModelForCausalLM; "
            "c = AutoConfig.for_model('hybrid_gpt2', n_layer=1, n_embd=16, n_head=2, vocab_size=32, mixer='gla'); "
            "print(type(AutoModelForCausalLM.from_config(c)).__name__)")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HybridGPT2LMHeadModel"
