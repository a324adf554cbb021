"""Text sources: the running Python's standard library, local files, or a streamed Hub dataset.

Every source yields (train, validation) lists of documents. Local sources of several files split by file,
with a hash of the file's relative path deciding the side, so the split is the same on every machine. A
single .jsonl/.parquet file splits by row (the same hash, of the row's index); a single text file splits by
lines: its last `val_fraction` of text, from a line start, is the validation document (as nanoGPT splits a book).

Local files are read as UTF-8. One that is not is refused, with a count of all such files, unless
`encoding_errors` says to skip it or to replace its undecodable bytes (both reported with a count). The
standard library skips its few deliberately non-UTF-8 test files, and says how many.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
ENCODING_ERRORS = ("refuse", "skip", "replace")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A text source.

    source: "stdlib", a local file or directory of .txt/.jsonl/.parquet files, or a Hub dataset
        name (streamed; "name" or "name:config").
    val_fraction: share of files (or, for a Hub dataset, documents) held out for validation.
    text_field: the field holding text in .jsonl/.parquet rows and Hub datasets.
    max_documents: rows read from a streamed Hub dataset, both splits together (None: all).
    encoding_errors: a local file that is not UTF-8 is "refuse"d (an error counting all such files),
        "skip"ped or read with its undecodable bytes "replace"d by U+FFFD (both counted in a warning).
        None: "skip" for the standard library, "refuse" for other files.
    """

    source: str = "stdlib"
    val_fraction: float = 0.02
    text_field: str = "text"
    max_documents: int | None = None
    encoding_errors: str | None = None

    def __post_init__(self) -> None:
        if self.encoding_errors is not None and self.encoding_errors not in ENCODING_ERRORS:
            raise SurgeryError(f"data.init_args.encoding_errors={self.encoding_errors!r}: choose one of {', '.join(ENCODING_ERRORS)}")

    @property
    def decode_mode(self) -> str:
        return self.encoding_errors or ("skip" if self.source.split(":")[0] == "stdlib" else "refuse")

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


class _NotUTF8(Exception):
    pass


def _decode(path: Path, mode: str) -> tuple[str | None, bool]:
    """(the file's text, whether it is UTF-8). Not UTF-8: text None for mode "skip", _NotUTF8 raised for "refuse"."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        if mode == "replace":
            return data.decode("utf-8", errors="replace"), False
        if mode == "skip":
            return None, False
        raise _NotUTF8(path) from None


def _jsonl_rows(path: Path, text: str, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SurgeryError(f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno}); fix or delete the line") from None
        if not isinstance(row, dict):
            raise SurgeryError(f"{path}, line {lineno}: a JSON {type(row).__name__}, not an object with a {text_field!r} field")
        if text_field not in row:
            fields = ", ".join(map(repr, row)) or "none"
            raise SurgeryError(f"{path}, line {lineno}: no field {text_field!r} (its fields: {fields}); "
                               "set data.init_args.text_field to the field that holds the text")
        if not isinstance(row[text_field], str):
            raise SurgeryError(f"{path}, line {lineno}: field {text_field!r} holds {json.dumps(row[text_field])[:40]}, not text")
        yield row[text_field]


def _read_file(path: Path, text_field: str, mode: str) -> tuple[Iterator[str], bool]:
    """(the documents of one file, whether it is UTF-8); no documents when it is skipped as not UTF-8."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        if text_field not in columns:
            raise SurgeryError(f"{path} has no column {text_field!r} (its columns: {', '.join(map(repr, columns))}); "
                               "set data.init_args.text_field to the column that holds the text")
        return iter(pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()), True
    text, utf8 = _decode(path, mode)
    if text is None:
        return iter(()), utf8
    return (_jsonl_rows(path, text, text_field) if path.suffix == ".jsonl" else iter([text])), utf8


def _split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation) of one text: validation is its last `val_fraction`, cut at the nearest line start."""
    if val_fraction <= 0 or len(text) < 2:
        return text, ""
    target = min(max(int(len(text) * (1 - val_fraction)), 1), len(text) - 1)
    before, after = text.rfind("\n", 0, target), text.find("\n", target, len(text) - 1)
    starts = [i + 1 for i in (before, after) if 0 <= i < len(text) - 1]
    cut = min(starts, key=lambda i: abs(i - target)) if starts else target
    return text[:cut], text[cut:]


def _refuse_non_utf8(corpus: Corpus, files: list[Path]) -> SurgeryError:
    bad = [p for p in files if p.suffix != ".parquet" and not _decode(p, "skip")[1]]
    names = ", ".join(p.name for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return SurgeryError(
        f"{len(bad)} of {len(files)} files of data {corpus.source!r} are not UTF-8 ({names}): convert them to UTF-8, "
        "or set data.init_args.encoding_errors to 'replace' (undecodable bytes become U+FFFD) or 'skip' (leave those files out)"
    )


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
    root, mode = corpus.root(), corpus.decode_mode
    not_utf8: list[Path] = []
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        if len(files) > 1 and _is_validation(rel, corpus.val_fraction) != (split == "validation"):
            continue
        try:
            docs, utf8 = _read_file(path, corpus.text_field, mode)
        except _NotUTF8:
            raise _refuse_non_utf8(corpus, files) from None
        if not utf8:
            not_utf8.append(path)
        if len(files) == 1 and path.suffix not in (".jsonl", ".parquet"):  # one text: split by lines
            docs = [_split_text(text, corpus.val_fraction)[split == "validation"] for text in docs]
        for i, doc in enumerate(docs):
            # A single file of rows cannot be split by file: its rows alternate instead.
            if len(files) == 1 and path.suffix in (".jsonl", ".parquet") and \
                    _is_validation(f"{rel}:{i}", corpus.val_fraction) != (split == "validation"):
                continue
            if doc and doc.strip():
                yield doc
    if not_utf8:
        done = "skipped" if mode == "skip" else "read with undecodable bytes replaced by U+FFFD"
        names = ", ".join(p.name for p in not_utf8[:5]) + (", ..." if len(not_utf8) > 5 else "")
        log.warning(f"data {corpus.source!r} ({split}): {len(not_utf8)} files that are not UTF-8 {done} ({names})")


def fingerprint(corpus: Corpus) -> str:
    """A short hash of the source, its split and (for local sources) every file's size and mtime."""
    key = [corpus.source, corpus.val_fraction, corpus.text_field, corpus.max_documents]
    files = corpus.files() or []
    if corpus.encoding_errors is not None:
        key.append(corpus.encoding_errors)
    if len(files) == 1 and files[0].suffix not in (".jsonl", ".parquet"):
        key.append("text split by lines")  # before: the whole file went to one side
    h = hashlib.sha256(json.dumps(key).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
