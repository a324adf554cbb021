"""Build step that ships the repository's `recipes/` and `checkpoints/` inside the package (`surgery/_bundled/`),
so that an installed `surgery` finds them from any directory (`surgery.models.shipped`). Every file under those two
directories is copied: recipes and checkpoints added later need no edit here. Metadata lives in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED_DIRS = ("recipes", "checkpoints")


class BuildPyWithShipped(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the checkout
            return
        root = Path(__file__).resolve().parent
        for name in SHIPPED_DIRS:
            if (root / name).is_dir():
                shutil.copytree(root / name, Path(self.build_lib) / "surgery" / "_bundled" / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildPyWithShipped})
