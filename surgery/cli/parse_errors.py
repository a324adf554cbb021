"""One line for a recipe the Lightning CLI's parser refuses, instead of jsonargparse's nested report.

A wrong key or type deep in a recipe (`model.init_args.schedule.gapz`) comes back from jsonargparse as a tree of
"Parser key" / "Problem with given class_path" / "Does not validate against any of the Union subtypes" lines, one
level per nested class, with each alternative of each union. `one_line` keeps the innermost problem and names the
full key as a recipe spells it; `SurgeryArgumentParser` prints that under the usage line (JSONARGPARSE_DEBUG=1
shows the full report). A command line with no recipe at all is told to pass one.

`--model.help CLASS` (and `--data.help CLASS`) lists the class's options the way recipes and the docs spell them,
`--model.init_args.lr`, not jsonargparse's shorthand `--model.lr` (which the parser also accepts).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys

from lightning.pytorch.cli import LightningArgumentParser

_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")
_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^- Problem with given class_path '([^']+)':\s*$")
_UNKNOWN = re.compile(r"^Option '([^']+)' is not accepted$")
_EXPECTED = re.compile(r"^Expected an? (.+?)\. Got value: (.*)$")
_REQUIRED = re.compile(r"^the following arguments are required: (.+)$")
_CLASS_HELP = re.compile(r"^Help for --(\w+)\.help=")  # the description of jsonargparse's `--model.help CLASS` parser

RECIPE_USAGE = "surgery {} --config RECIPE.yaml [--key value ...]"
EXAMPLE_RECIPE = "recipes/remove_ln/quickstart.yaml"


def _load(class_path: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _type_name(text: str) -> str:
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text


def _accepted(cls) -> list[str]:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def one_line(message: str) -> str:
    """The innermost problem of a jsonargparse error message, prefixed by the full recipe key it concerns."""
    path: list[tuple[int, str]] = []  # (indent, key segment) of the levels above the current line
    classes: dict[int, object] = {}  # indent -> class being parsed at that level
    found: tuple[list[str], str, object] | None = None
    for raw in message.splitlines():
        text = raw.strip()
        if not text or text.startswith(_NOISE):
            continue
        indent = len(raw) - len(raw.lstrip())
        path = [p for p in path if p[0] < indent]
        cls = next((classes[i] for i in sorted(classes, reverse=True) if i < indent), None)
        if m := _KEY.match(text):
            path.append((indent, m.group(1)))
            if m.group(2):
                found = ([p[1] for p in path], m.group(2), cls)
        elif m := _CLASS.match(text):
            loaded = _load(m.group(1))
            classes = {i: c for i, c in classes.items() if i < indent}
            classes[indent] = loaded
            if loaded is None:  # the class itself could not be imported
                path.append((indent, "class_path"))
            elif not dataclasses.is_dataclass(loaded):  # a dataclass field is written without init_args
                path.append((indent, "init_args"))
        else:
            found = ([p[1] for p in path], text.lstrip("- "), cls)
    if found is None:
        return message.strip().replace("\n", " ")
    keys, problem, cls = found
    if m := _UNKNOWN.match(problem):
        key = ".".join([*keys, m.group(1)])
        names = _accepted(cls) if cls is not None else []
        close = difflib.get_close_matches(m.group(1), names, n=1)
        hint = f"did you mean {'.'.join([*keys, close[0]])}? " if close else ""
        takes = f"{cls.__name__} takes: {', '.join(names)}" if names else "see --print_config for the accepted keys"
        return f"{key}: no such key; {hint}{takes}"
    if not keys:
        return problem
    key = ".".join(keys)
    if m := _EXPECTED.match(problem):
        return f"{key}={m.group(2)!r}: expected {_type_name(m.group(1))}"
    return f"{key}: {problem}"


def _gives_config(args: list[str]) -> bool:
    return any(a == "-c" or a.startswith("--config") or (a.startswith("-c") and not a.startswith("--")) for a in args)


def missing_recipe(message: str, args: list[str] | None) -> tuple[str, str] | None:
    """`(subcommand, message)` when the model or data module is missing, else None: with no --config, pass one;
    with one, the recipe lacks the section."""
    m = _REQUIRED.match(message.strip())
    if not m:
        return None
    keys = [k.strip() for k in m.group(1).split(",")]
    missing = [k.split(".", 1)[1] for k in keys if k.count(".") == 1 and k.split(".", 1)[1] in ("model", "data")]
    if not missing:
        return None
    sub = keys[0].split(".", 1)[0]
    if not _gives_config(args or []):
        return sub, f"no recipe given: pass --config RECIPE.yaml, e.g. {EXAMPLE_RECIPE}"
    names = " and ".join(sorted(missing))
    return sub, (f"the recipe sets no {names}: a recipe names each of model and data by class_path "
                 f"(with its init_args), e.g. {EXAMPLE_RECIPE}")


class SurgeryArgumentParser(LightningArgumentParser):
    """The Lightning CLI's parser, reporting a refused recipe in one line (exit status 2)."""

    _given_args: list[str] | None = None

    def parse_args(self, args=None, *rest, **kwargs):
        self._given_args = list(sys.argv[1:] if args is None else args)  # for `error`: was a --config given?
        return super().parse_args(args, *rest, **kwargs)

    def add_class_arguments(self, theclass, nested_key=None, *args, **kwargs):
        # In the parser behind `--model.help CLASS`, the class's options go under `model.init_args`, as recipes
        # and the docs write them (and as its nested `--model.init_args.schedule.help` is then spelled).
        m = _CLASS_HELP.match(self.description or "")
        if m and nested_key == m.group(1):
            nested_key = f"{nested_key}.init_args"
        return super().add_class_arguments(theclass, nested_key, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):  # nested parser: its caller reports
            return super().error(message, ex)
        if missing := missing_recipe(message, self._given_args):
            sub, problem = missing
            sys.stderr.write(f"usage: {RECIPE_USAGE.format(sub)}\nsurgery {sub}: error: {problem}\n")
            sys.exit(2)
        parser = getattr(ex, "subcommand_parser", None) or self
        parser.print_usage(sys.stderr)
        sub = parser.prog.split()[-1] if parser.prog else ""
        prog = f"surgery {sub}" if sub in ("fit", "validate", "test", "predict") else "surgery"
        sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
        sys.exit(2)

