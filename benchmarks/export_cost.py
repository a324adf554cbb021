"""Time to export an all-fake removal model as a plain LN-free GPT-2, to save it, and to load it into
TransformerLens (`surgery.lens.load_hooked` on the saved directory: reading the weights included)."""

from __future__ import annotations

import tempfile
import time

from surgery.lens import load_hooked
from surgery.remove_ln.export import export_ln_free


def run(removal_model, repeats: int = 1) -> dict:
    """removal_model: prepared by `prepare_for_removal`, every point fake.
    Returns {"export_s", "save_s", "load_hooked_s", "bytes"} (medians are minima over `repeats`: one-off
    costs, the fastest run is the least disturbed by other jobs)."""
    times = {"export_s": [], "save_s": [], "load_hooked_s": []}
    size = 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            exported = export_ln_free(removal_model)
            times["export_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            exported.save_pretrained(tmp)
            times["save_s"].append(time.perf_counter() - start)
            del exported
            start = time.perf_counter()
            hooked = load_hooked(tmp)
            times["load_hooked_s"].append(time.perf_counter() - start)
            del hooked
            from pathlib import Path

            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {**{k: min(v) for k, v in times.items()}, "bytes": size, "repeats": repeats}
