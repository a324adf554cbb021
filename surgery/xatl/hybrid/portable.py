"""The code saved beside a hybrid, so that `trust_remote_code=True` loads it where `surgery` is not installed.

The package's own modules travel (`MODULES`: the mixers, the cache, the hybrid classes of
surgery.xatl.hybrid.core, the error type), flattened into the model directory, each `from surgery.a.b import x`
rewritten to `from .b import x`; they import nothing else from `surgery` (checked when writing). A generated
`modeling_hybrid.py` builds the config and model classes of the source type with the family facts written in, and
config.json gets an `auto_map` naming them. Loading then needs torch and transformers only.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

MODULES = ("surgery.errors", "surgery.xatl.mixers.kernels", "surgery.xatl.mixers.scan", "surgery.xatl.mixers.mamba",
           "surgery.xatl.mixers.mamba2", "surgery.xatl.mixers.linear_attention", "surgery.xatl.mixers",
           "surgery.xatl.hybrid.cache", "surgery.xatl.hybrid.core")
ENTRY = "modeling_hybrid"
_FROM_SURGERY = re.compile(r"^(\s*)from (surgery(?:\.\w+)*) import ", re.MULTILINE)


def flat_name(module: str) -> str:
    """The file a package module becomes beside the model: its last dotted name (surgery.xatl.mixers -> mixers)."""
    return module.rpartition(".")[2]


def portable_source(module: str) -> str:
    """The source of `module` with its imports of other travelling modules made relative; a `surgery` import of
    a module that does not travel is an error (it would fail where surgery is not installed)."""
    text = Path(importlib.util.find_spec(module).origin).read_text()

    def relative(m: re.Match) -> str:
        if m.group(2) not in MODULES:
            raise ValueError(f"{module} imports {m.group(2)}, which is not saved beside a hybrid: add it to "
                             "surgery.xatl.hybrid.portable.MODULES or import it elsewhere")
        return f"{m.group(1)}from .{flat_name(m.group(2))} import "

    out = _FROM_SURGERY.sub(relative, text)
    for node in ast.walk(ast.parse(out)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        if any(n == "surgery" or n.startswith("surgery.") for n in names):
            raise ValueError(f"{module} imports {names} in a form the saved code cannot rewrite: use `from surgery.x import y`")
    return out


def entry_source(source_type: str, blocks: str, attn: str, cache_names: tuple[str, ...], how_to_load: str) -> str:
    config_name = "Hybrid" + CONFIG_MAPPING[source_type].__name__
    model_name = "Hybrid" + MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[source_type]].__name__
    return (f'"""The hybrid of {source_type!r} (mixers in place of attention), written by surgery\'s save_pretrained: '
            f'load it with\nAutoModelForCausalLM.from_pretrained(this directory, trust_remote_code=True)."""\n\n'
            f"from .core import make_hybrid_classes\n\n"
            f"{config_name}, {model_name} = make_hybrid_classes(\n"
            f"    {source_type!r}, blocks={blocks!r}, attn={attn!r}, cache_names={tuple(cache_names)!r},\n"
            f"    how_to_load={how_to_load!r}, module=__name__)\n")


def write_portable_code(directory, source_type: str, blocks: str, attn: str, cache_names: tuple[str, ...],
                        how_to_load: str = "") -> list[Path]:
    """Write the travelling modules and `modeling_hybrid.py` into `directory` (a saved hybrid of `source_type`)
    and add their `auto_map` to its config.json. Returns the files written."""
    directory = Path(directory)
    written = []
    for module in MODULES:
        path = directory / f"{flat_name(module)}.py"
        path.write_text(portable_source(module))
        written.append(path)
    entry = directory / f"{ENTRY}.py"
    entry.write_text(entry_source(source_type, blocks, attn, cache_names, how_to_load))
    written.append(entry)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config_cls = CONFIG_MAPPING[source_type]
    config["auto_map"] = {"AutoConfig": f"{ENTRY}.Hybrid{config_cls.__name__}",
                          "AutoModelForCausalLM": f"{ENTRY}.Hybrid{MODEL_FOR_CAUSAL_LM_MAPPING[config_cls].__name__}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written
