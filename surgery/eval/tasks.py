"""Offline lm-evaluation-harness tasks built from held-out text: `stdlib_next_line`, multiple choice on code.

Each doc is a few consecutive lines of a held-out file (the context) and four candidate next lines: the real one
and three lines drawn from other held-out files. A model scores each candidate by its log-likelihood given the
context; accuracy is the share of docs where the real line scores highest (chance: 1/4). The files come from the
validation split of `surgery.data.Corpus` (by default the running Python's standard library, the same files
`surgery eval --data stdlib` holds out), so a model trained on the train split has never seen them.

`stdlib_next_line(out_dir)` writes `<task>.jsonl` and `<task>.yaml` (an lm-eval task config) into `out_dir`; pass
that folder to lm-eval's `TaskManager(include_path=...)` or `surgery eval MODEL --tasks stdlib_next_line
--include-path out_dir`. The docs depend only on the corpus, the arguments and the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from surgery.errors import SurgeryError

TASK = "stdlib_next_line"
MIN_CHARS, MAX_CHARS = 8, 100  # a candidate line, stripped, has this many characters (skips `)`, `else:`, ...)

YAML = """\
# lm-evaluation-harness task written by surgery.eval.tasks.stdlib_next_line({args}).
# Multiple choice: the context is the lines before, each choice one candidate next line (scored as is, no
# delimiter); gold is the index of the real next line. Docs are in the .jsonl beside this file.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _usable(line: str) -> bool:
    return MIN_CHARS <= len(line.strip()) <= MAX_CHARS


def next_line_docs(texts: list[str], n_docs: int, context_lines: int = 6, max_context_chars: int = 300,
                   n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice docs {"context", "choices", "gold", "file", "line"} from `texts` (one string per file).

    context: up to `context_lines` lines (right-stripped, each ending in a newline) before a usable line, fewer when
    they exceed `max_context_chars` characters; its last line is not blank. choices: that line and
    `n_choices - 1` distinct usable lines of other texts, in a seeded random order; gold: the real line's index;
    file, line: the index of its text in `texts` and its 1-based line number there.
    """
    lines = [[line.rstrip() for line in text.splitlines()] for text in texts]
    spots = [(f, i) for f, ls in enumerate(lines) for i in range(1, len(ls)) if _usable(ls[i]) and ls[i - 1].strip()]
    pool = sorted({(f, line) for f, ls in enumerate(lines) for line in ls if _usable(line)})
    if len(texts) < 2 or len(spots) < n_docs:
        raise SurgeryError(f"{n_docs} docs need at least 2 files with {n_docs} usable lines; found {len(texts)} files "
                           f"with {len(spots)}: ask for fewer docs or use a larger corpus")
    rng = random.Random(seed)
    docs = []
    for f, i in sorted(rng.sample(spots, n_docs)):
        context = lines[f][max(0, i - context_lines):i]
        while len(context) > 1 and sum(len(c) + 1 for c in context) > max_context_chars:
            context = context[1:]
        gold_line = lines[f][i]
        others: list[str] = []
        for _ in range(1000 * n_choices):
            if len(others) == n_choices - 1:
                break
            g, line = pool[rng.randrange(len(pool))]
            if g != f and line.strip() not in {o.strip() for o in [gold_line, *others]}:
                others.append(line)
        else:
            raise SurgeryError(f"too few distinct usable lines outside file {f} for {n_choices} choices: use a larger corpus")
        gold = rng.randrange(n_choices)
        docs.append({"context": "".join(c + "\n" for c in context), "choices": others[:gold] + [gold_line] + others[gold:],
                     "gold": gold, "file": f, "line": i + 1})
    return docs


def stdlib_next_line(out_dir: str | Path, n_docs: int = 500, data: str = "stdlib", seed: int = 0,
                     context_lines: int = 6, max_context_chars: int = 300, task: str = TASK) -> Path:
    """Write the task `task` (`<task>.jsonl`, `<task>.yaml`) into `out_dir` and return the YAML's path.

    data: the corpus whose validation files are read ("stdlib" or a local folder, as `surgery eval --data`).
    The other arguments are those of `next_line_docs`. A file already holding the same text is left untouched, so
    datasets' cache of it stays valid.
    """
    from surgery.data.corpus import Corpus, load_documents

    texts = list(load_documents(Corpus(data), "validation"))
    docs = next_line_docs(texts, n_docs, context_lines, max_context_chars, seed=seed)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    jsonl, yaml = out / f"{task}.jsonl", out / f"{task}.yaml"
    args = f"n_docs={n_docs}, data={data!r}, seed={seed}, context_lines={context_lines}, max_context_chars={max_context_chars}"
    _write_if_changed(jsonl, "".join(json.dumps(d) + "\n" for d in docs))
    _write_if_changed(yaml, YAML.format(args=args, task=task, data=json.dumps(str(jsonl))))
    return yaml


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
