"""The README's first Python snippet (LayerNorm removal without Lightning) runs as written, from another directory."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_first_readme_snippet_runs_and_removes_every_norm(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert "prepare_for_removal" in snippet
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny steps: more threads only contend on a shared machine
    try:
        exec(compile(snippet, "README.md", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    from surgery.remove_ln.export import marked_ln_free

    assert all(ln.is_fake for ln in scope["points"].values()) and len(scope["removal"].removed) == 13
    assert marked_ln_free(scope["ln_free"])
