"""Text sources: the running Python's standard library, local files, or a streamed Hub dataset.

Every source yields (train, validation) lists of documents. Local sources split by file, with a
hash of the file's relative path deciding the side, so the split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Corpus:
    """A text source.

    source: "stdlib", a local file or directory of .txt/.jsonl/.parquet files, or a Hub dataset
        name (streamed; "name" or "name:config").
    val_fraction: share of files (or, for a Hub dataset, documents) held out for validation.
    text_field: the field holding text in .jsonl/.parquet rows and Hub datasets.
    max_documents: rows read from a streamed Hub dataset, both splits together (None: all).
    """

    source: str = "stdlib"
    val_fraction: float = 0.02
    text_field: str = "text"
    max_documents: int | None = None

    def files(self) -> list[Path] | None:
        """The files of a local source, sorted; None for a Hub dataset."""
        if self.source == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
        path = Path(self.source).expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if self.source.startswith(("/", ".", "~")) or Path(self.source).suffix in LOCAL_SUFFIXES:
            raise SurgeryError(f"data path {self.source!r} does not exist; use 'stdlib', a local file or directory, or a Hub dataset name")
        return None

    def root(self) -> Path:
        if self.source == "stdlib":
            return Path(sysconfig.get_paths()["stdlib"])
        path = Path(self.source).expanduser()
        return path if path.is_dir() else path.parent


def _is_validation(rel_path: str, val_fraction: float) -> bool:
    digest = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big")
    return digest / 2**64 < val_fraction


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[text_field]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return  # a few stdlib test files are deliberately not UTF-8


def _hub_documents(corpus: Corpus, split: str) -> Iterator[str]:
    from datasets import load_dataset

    name, _, config = corpus.source.partition(":")
    try:
        stream = load_dataset(name, config or None, split="train", streaming=True)
    except Exception as err:
        raise SurgeryError(
            f"could not stream Hub dataset {corpus.source!r} ({type(err).__name__}: {err}); "
            "without internet use --data stdlib or a local .txt/.jsonl/.parquet path"
        ) from err
    # Both splits come from the same first `max_documents` rows, so the validation split never
    # streams further than the training one.
    for i, row in enumerate(itertools.islice(stream, corpus.max_documents)):
        if _is_validation(str(i), corpus.val_fraction) == (split == "validation"):
            yield row[corpus.text_field]


def load_documents(corpus: Corpus, split: str) -> Iterator[str]:
    """Documents of one split ("train" or "validation"), non-empty, in a fixed order."""
    if split not in ("train", "validation"):
        raise ValueError(split)
    files = corpus.files()
    if files is None:
        yield from _hub_documents(corpus, split)
        return
    root = corpus.root()
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        # A single file cannot be split by file: its documents alternate instead.
        if len(files) > 1 and _is_validation(rel, corpus.val_fraction) != (split == "validation"):
            continue
        for i, doc in enumerate(_read_file(path, corpus.text_field)):
            if len(files) == 1 and _is_validation(f"{rel}:{i}", corpus.val_fraction) != (split == "validation"):
                continue
            if doc and doc.strip():
                yield doc

def fingerprint(corpus: Corpus) -> str:
    """A short hash of the source, its split and (for local sources) every file's size and mtime."""
    h = hashlib.sha256(json.dumps([corpus.source, corpus.val_fraction, corpus.text_field, corpus.max_documents]).encode())
    for p in corpus.files() or []:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
