"""Text sources: the running Python's standard library, local files, or a streamed Hub dataset.

Every source yields the documents of a split: "train", "validation", or "all" (the whole source: what `surgery
eval` and `surgery verify` score by default for a local file or directory). Local sources of several files split
by file, with a hash of the file's relative path deciding the side, so the split is the same on every machine. A
single .jsonl/.parquet/.csv file splits by row (the same hash, of the row's index); a single text file splits by
lines: its last `val_fraction` of text, from a line start, is the validation document (as nanoGPT splits a book).
Which local files are read, and how each format becomes documents: `surgery.data.formats`.

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

from surgery.data.formats import LOCAL_SUFFIXES, ROW_SUFFIXES, SUPPORTED, NotUTF8, check_file, decode, directory_files, \
    read_file, suffix
from surgery.errors import SurgeryError

SPLITS = ("train", "validation", "all")
ENCODING_ERRORS = ("refuse", "skip", "replace")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A text source.

    source: "stdlib", a local .txt/.jsonl/.parquet/.csv file or a directory of them, or a Hub dataset
        name (streamed; "name" or "name:config").
    val_fraction: share of files (or, for a Hub dataset, documents) held out for validation.
    text_field: the field (column) holding text in .jsonl/.parquet/.csv rows and Hub datasets.
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

    @property
    def local(self) -> bool:
        """A local file or directory (not the standard library, not a Hub dataset)."""
        return self.source.split(":")[0] != "stdlib" and self.files() is not None

    @property
    def default_eval_split(self) -> str:
        """What `surgery eval` and `surgery verify` score unless told: "all" of a local file or directory (a text the
        user names is scored whole), the "validation" split of the standard library and of a Hub dataset."""
        return "all" if self.local else "validation"

    def files(self) -> list[Path] | None:
        """The files of a local source, sorted; None for a Hub dataset. A file or directory surgery cannot read is
        refused (`surgery.data.formats`)."""
        if self.source == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
        path = Path(self.source).expanduser()
        if path.is_file():
            check_file(path)
            return [path]
        if path.is_dir():
            return directory_files(path)
        if self.source.startswith(("/", ".", "~")) or suffix(Path(self.source)) in LOCAL_SUFFIXES:
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
    bad = [p for p in files if suffix(p) != ".parquet" and not decode(p, "skip")[1]]
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
            f"without internet use --data stdlib or a local {SUPPORTED} path"
        ) from err
    # Both splits come from the same first `max_documents` rows, so the validation split never
    # streams further than the training one.
    for i, row in enumerate(itertools.islice(stream, corpus.max_documents)):
        if _on_side(str(i), corpus, split):
            yield row[corpus.text_field]


def _on_side(rel: str, corpus: Corpus, split: str) -> bool:
    return split == "all" or _is_validation(rel, corpus.val_fraction) == (split == "validation")


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def load_documents(corpus: Corpus, split: str) -> Iterator[str]:
    """Documents of one split ("train", "validation" or "all"), non-empty, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(split)
    files = corpus.files()
    if files is None:
        yield from _hub_documents(corpus, split)
        return
    root, mode = corpus.root(), corpus.decode_mode
    not_utf8: list[Path] = []
    for path in files:
        rel = _relative(path, root)
        if len(files) > 1 and not _on_side(rel, corpus, split):
            continue
        try:
            docs, utf8 = read_file(path, corpus.text_field, mode)
        except NotUTF8:
            raise _refuse_non_utf8(corpus, files) from None
        if not utf8:
            not_utf8.append(path)
        if len(files) == 1 and suffix(path) not in ROW_SUFFIXES and split != "all":  # one text: split by lines
            docs = [_split_text(text, corpus.val_fraction)[split == "validation"] for text in docs]
        for i, doc in enumerate(docs):
            # A single file of rows cannot be split by file: its rows alternate instead.
            if len(files) == 1 and suffix(path) in ROW_SUFFIXES and not _on_side(f"{rel}:{i}", corpus, split):
                continue
            if doc and doc.strip():
                yield doc
    if not_utf8:
        done = "skipped" if mode == "skip" else "read with undecodable bytes replaced by U+FFFD"
        names = ", ".join(p.name for p in not_utf8[:5]) + (", ..." if len(not_utf8) > 5 else "")
        log.warning(f"data {corpus.source!r} ({split}): {len(not_utf8)} files that are not UTF-8 {done} ({names})")


def describe_split(corpus: Corpus, split: str) -> str:
    """What a split of the corpus holds, in words: "all 40 files", "its last 2% of text", ..."""
    held = corpus.val_fraction if split == "validation" else 1 - corpus.val_fraction
    share = f"{held * 100:g}%"
    files = corpus.files()
    if files is None:
        rows = f"its first {corpus.max_documents} rows" if corpus.max_documents is not None else "its rows"
        return rows if split == "all" else f"about {share} of {rows}, by a hash of each row's index"
    if len(files) > 1:
        if split == "all":
            return f"all {len(files)} files"
        side = sum(_on_side(_relative(p, corpus.root()), corpus, split) for p in files)
        return f"{side} of its {len(files)} files (about {share}, by a hash of each file's path)"
    if split == "all":
        return "the whole file"
    if suffix(files[0]) in ROW_SUFFIXES:
        return f"about {share} of its rows, by a hash of each row's index"
    return f"its {'last' if split == 'validation' else 'first'} {share} of text, cut at a line start"


def short_split_cause(corpus: Corpus, split: str, tokens: int) -> str:
    """Why a split holds only `tokens` tokens, in words for an error message ("" when it is simply short); the fix
    is the caller's, as training and each command have their own settings."""
    if split == "validation" and corpus.val_fraction <= 0:
        return "its val_fraction is 0, so nothing is held out"
    files = corpus.files()
    if files is not None and len(files) > 1 and split != "all" and \
            not any(_on_side(_relative(p, corpus.root()), corpus, split) for p in files):
        return (f"none of its {len(files)} files falls in the {split} split: a hash of each file's path holds about "
                f"{corpus.val_fraction * 100:g}% of them out")
    if tokens == 0:
        return f"no text in {describe_split(corpus, split)}: every document is empty or whitespace"
    return f"the {split} split is {describe_split(corpus, split)}" if split != "all" else ""


def fingerprint(corpus: Corpus) -> str:
    """A short hash of the source, its split and (for local sources) every file's size and mtime."""
    key = [corpus.source, corpus.val_fraction, corpus.text_field, corpus.max_documents]
    files = corpus.files() or []
    if corpus.encoding_errors is not None:
        key.append(corpus.encoding_errors)
    if len(files) == 1 and suffix(files[0]) not in ROW_SUFFIXES:
        key.append("text split by lines")  # before: the whole file went to one side
    h = hashlib.sha256(json.dumps(key).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
