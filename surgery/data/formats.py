"""Local corpus files: which ones are read, and how each format becomes documents.

Formats, chosen by the file's extension (any case):
- `.txt`: the whole file is one document (a single text file is then split by lines, see `surgery.data.corpus`);
- `.jsonl`: one JSON object a line, its `text_field` a document;
- `.parquet`: its `text_field` column, one document a row;
- `.csv`: comma-separated values with a header row (Python's `csv` module: quoted fields may hold commas, quotes
  and line breaks), its `text_field` column, one document a row.

A single file of any other extension is refused by name. A directory is read recursively: its files of these
extensions are the corpus; other files are left out and named in one warning (a README.md or LICENSE beside the
data does no harm), and a directory with none of these files is refused, naming what it holds. Hidden files
and folders (names starting with ".", such as .git or .DS_Store) are ignored without a word.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from surgery.errors import SurgeryError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")
ROW_SUFFIXES = (".jsonl", ".parquet", ".csv")  # files of rows: a single one splits by row, not by lines
SUPPORTED = ", ".join(LOCAL_SUFFIXES[:-1]) + " or " + LOCAL_SUFFIXES[-1]
log = logging.getLogger("surgery.data.corpus")
_warned: set[str] = set()  # directories whose left-out files were already named in this process


def suffix(path: Path) -> str:
    return path.suffix.lower()


def _kind(path: Path) -> str:
    return suffix(path) or "with no extension"


def _listed(paths: list[Path], root: Path, shown: int = 5) -> str:
    """'3 .md, 1 no extension: README.md, notes/a.md, ...' (counts by extension, then the first names)."""
    counts = ", ".join(f"{n} {kind}" for kind, n in Counter(map(_kind, paths)).most_common())
    names = ", ".join(p.relative_to(root).as_posix() for p in paths[:shown]) + (", ..." if len(paths) > shown else "")
    return f"{counts}: {names}"


def check_file(path: Path) -> None:
    """SurgeryError when a single data file has an extension surgery does not read."""
    if suffix(path) not in LOCAL_SUFFIXES:
        what = f"a {suffix(path)} file" if suffix(path) else "a file with no extension"
        raise SurgeryError(f"data file '{path}' is {what}, which surgery does not read: pass a {SUPPORTED} file "
                           "(plain text: rename it to .txt; a table: save it as .csv, .jsonl or .parquet)")


def directory_files(root: Path) -> list[Path]:
    """The files of a data directory that surgery reads, sorted; the others named in one warning (once per process)."""
    visible = sorted(p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts)
                     and p.is_file())
    read = [p for p in visible if suffix(p) in LOCAL_SUFFIXES]
    others = [p for p in visible if suffix(p) not in LOCAL_SUFFIXES]
    if not read:
        holds = f"its {len(visible)} files are {_listed(others, root)}" if visible else "it holds no files"
        raise SurgeryError(f"data directory '{root}' has no file surgery reads ({holds}; hidden files are ignored): "
                           f"surgery reads {SUPPORTED} files; convert the text to one of these, or name a single file")
    if others and str(root) not in _warned:
        _warned.add(str(root))
        log.warning(f"data directory '{root}': {len(others)} of {len(visible)} files left out, as surgery reads only "
                    f"{SUPPORTED} files ({_listed(others, root)})")
    return read


class MissingTextField(SurgeryError):
    """A row or table without the text field. The message names training's setting (data.init_args.text_field);
    `surgery eval` and `surgery verify` retell it with their own flag (`for_flag`)."""

    def __init__(self, what: str, noun: str):
        self.what, self.noun = what, noun
        super().__init__(f"{what}; set data.init_args.text_field to the {noun} that holds the text")

    def for_flag(self, flag: str) -> SurgeryError:
        return SurgeryError(f"{self.what}; pass {flag} with the {self.noun} that holds the text")


class NotUTF8(Exception):
    pass


def decode(path: Path, mode: str) -> tuple[str | None, bool]:
    """(the file's text, whether it is UTF-8). Not UTF-8: text None for mode "skip", NotUTF8 raised for "refuse"."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        if mode == "replace":
            return data.decode("utf-8", errors="replace"), False
        if mode == "skip":
            return None, False
        raise NotUTF8(path) from None


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
            raise MissingTextField(f"{path}, line {lineno}: no field {text_field!r} (its fields: {fields})", "field")
        if not isinstance(row[text_field], str):
            raise SurgeryError(f"{path}, line {lineno}: field {text_field!r} holds {json.dumps(row[text_field])[:40]}, not text")
        yield row[text_field]


def _csv_rows(path: Path, text: str, text_field: str) -> list[str]:
    """The `text_field` column of a CSV file with a header row; a short row's missing cell is an empty document."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # one document per cell: a book-length cell is fine (the default stops at 128 KiB)
    try:
        # newline="": line ends inside quoted cells stay as written; a byte-order mark (Excel's UTF-8) is not a column name
        reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
        columns = reader.fieldnames
        if not columns:
            raise SurgeryError(f"{path} is empty: a .csv corpus needs a header row naming its columns, one of them {text_field!r}")
        if text_field not in columns:
            raise MissingTextField(f"{path} has no column {text_field!r} (its columns: {', '.join(map(repr, columns))})", "column")
        return [row[text_field] or "" for row in reader]
    except csv.Error as err:
        raise SurgeryError(f"{path}, line {reader.line_num}: not valid CSV ({err}); fix the line") from None
    finally:
        csv.field_size_limit(limit)


def read_file(path: Path, text_field: str, mode: str) -> tuple[Iterator[str], bool]:
    """(the documents of one file, whether it is UTF-8); no documents when it is skipped as not UTF-8."""
    if suffix(path) == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        if text_field not in columns:
            raise MissingTextField(f"{path} has no column {text_field!r} (its columns: {', '.join(map(repr, columns))})", "column")
        return iter(pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()), True
    text, utf8 = decode(path, mode)
    if text is None:
        return iter(()), utf8
    if suffix(path) == ".jsonl":
        return _jsonl_rows(path, text, text_field), utf8
    if suffix(path) == ".csv":
        return iter(_csv_rows(path, text, text_field)), utf8
    return iter([text]), utf8
