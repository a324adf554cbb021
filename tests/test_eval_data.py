"""What `surgery eval` and `surgery verify` score, the formats a corpus may have, and what users are told when the
data cannot be used: the whole of a local file by default (the split, the tokens and the blocks in the JSON and the
table), .csv read by column, other extensions refused by name, a too-small split explained with the command's own
flags (training keeps naming data.*). The model is the shipped tiny GPT-2 (4 layers, 128 wide, 256 positions)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from surgery.cli.entry import main
from surgery.data import TokenBlocks
from surgery.data.corpus import Corpus, _is_validation, load_documents
from surgery.errors import SurgeryError

MODEL = str(Path(__file__).parents[1] / "checkpoints" / "tiny-gpt2-stdlib")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")  # rich: one table row a line


def book(path: Path, lines: int = 120) -> Path:
    path.write_text("".join(f"def step_{i}(x):\n    return x + {i}  # line {i}\n" for i in range(lines)))
    return path


def command(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); stdout keeps its lines, but rich's wrapped titles and captions are joined by
    `flat` for the tests that read them."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def flat(text: str) -> str:
    return " ".join(text.split())


def table_row(out: str) -> list[str]:
    """The cells of the table's one data row."""
    [row] = [line for line in out.splitlines() if line.startswith("│")]
    return [cell.strip() for cell in row.strip("│").split("│")]


def tokens_of(texts: list[str]) -> int:
    from surgery.data.tokenizer import get_tokenizer

    tok = get_tokenizer(MODEL)
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + end-of-text each


# -- 1. what eval and verify score, and say they scored -------------------------------------------------------

def test_eval_scores_the_whole_file_by_default_and_says_what_it_scored(tmp_path, capsys):
    text = book(tmp_path / "book.txt")
    code, out, _ = command(capsys, "eval", MODEL, "--data", str(text), "--block-size", "32", "--json", str(tmp_path / "all.json"))
    assert code == 0
    result = json.loads((tmp_path / "all.json").read_text())
    whole = tokens_of([text.read_text()])
    assert {k: result[k] for k in ("split", "split_tokens", "blocks", "block_size", "tokens")} == {
        "split": "all", "split_tokens": whole, "blocks": whole // 32, "block_size": 32, "tokens": whole // 32 * 31}
    assert "val_fraction" not in result
    assert f"on {text}: all of it (the whole file)" in flat(out)
    assert table_row(out)[2:] == ["all", str(whole // 32), "32", str(whole // 32 * 31)]
    assert f"scored {whole // 32} blocks of 32 of the {whole} tokens in the data ({whole % 32} left over" in flat(out)

    code, out, _ = command(capsys, "eval", MODEL, "--data", str(text), "--block-size", "32", "--split", "validation",
                           "--json", str(tmp_path / "val.json"))
    held = json.loads((tmp_path / "val.json").read_text())
    assert code == 0 and held["split"] == "validation" and held["val_fraction"] == 0.02
    assert 32 <= held["split_tokens"] < 0.05 * whole and held["blocks"] == held["split_tokens"] // 32
    assert f"on {text}: validation split (its last 2% of text, cut at a line start)" in flat(out)
    assert table_row(out)[2] == "validation"


def test_max_blocks_caps_the_whole_input_and_the_caption_says_so(tmp_path, capsys):
    text = book(tmp_path / "book.txt")
    code, out, _ = command(capsys, "eval", MODEL, "--data", str(text), "--block-size", "32", "--max-blocks", "3",
                           "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and result["blocks"] == 3 and result["tokens"] == 3 * 31 and result["split_tokens"] > 10 * 32
    assert "left over, past --max-blocks or short of a block" in flat(out)


def test_the_default_split_is_all_for_local_data_and_validation_for_stdlib_and_the_hub(tmp_path):
    book(tmp_path / "book.txt")
    (tmp_path / "dir").mkdir()
    book(tmp_path / "dir" / "a.txt")
    assert Corpus(str(tmp_path / "book.txt")).default_eval_split == "all"
    assert Corpus(str(tmp_path / "dir")).default_eval_split == "all"
    assert Corpus("stdlib").default_eval_split == "validation"
    assert Corpus("owner/web:en").default_eval_split == "validation"  # a Hub name: nothing is read to decide


def test_the_all_split_holds_every_document_once(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    corpus = Corpus(str(root), val_fraction=0.2)
    train, val = list(load_documents(corpus, "train")), list(load_documents(corpus, "validation"))
    assert val and sorted(load_documents(corpus, "all")) == sorted(train + val)


def test_verify_scores_the_whole_file_by_default_and_reports_it(tmp_path, capsys):
    text = book(tmp_path / "book.txt", lines=200)
    out_dir = tmp_path / "verify"
    code, out, _ = command(capsys, "verify", MODEL, "--out", str(out_dir), "--data", str(text), "--block-size", "64",
                           "--val-blocks", "3", "--dla-blocks", "1", "--seg-len", "8", "--prompts", "2")
    assert code == 0
    report = json.loads((out_dir / "report.json").read_text())
    whole = tokens_of([text.read_text()])
    assert {k: report[k] for k in ("split", "split_tokens", "blocks", "block_size")} == {
        "split": "all", "split_tokens": whole, "blocks": 3, "block_size": 64}
    assert f"on {text}, all of it (the whole file): 3 blocks of 64 tokens" in flat(out)
    assert f"Data: {text}, all of it (the whole file): 3 blocks of 64 tokens;" in (out_dir / "report.md").read_text()


# -- 2. formats: .csv by column, other extensions refused by name ----------------------------------------------

CSV_ROWS = [{"id": "1", "text": "plain"}, {"id": "2", "text": 'a, b and "quoted"'}, {"id": "3", "text": "two\nlines\r\nend"},
            {"id": "4", "text": ""}, {"id": "5", "text": "last"}]


def write_csv(path: Path, rows=CSV_ROWS, fields=("id", "text"), encoding="utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:  # the csv module's own writer is the reference
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])  # utf-8-sig: a byte-order mark, as Excel writes
def test_a_csv_corpus_is_read_by_column_not_as_raw_text(tmp_path, encoding):
    path = write_csv(tmp_path / "rows.csv", encoding=encoding)
    docs = list(load_documents(Corpus(str(path)), "all"))
    assert docs == ["plain", 'a, b and "quoted"', "two\nlines\r\nend", "last"]  # no header, no quotes, empty row dropped
    split = Corpus(str(path), val_fraction=0.4)
    train, val = list(load_documents(split, "train")), list(load_documents(split, "validation"))
    assert val and train and sorted(train + val) == sorted(docs)  # a single .csv splits by row
    body = write_csv(tmp_path / "body.csv", [{"n": 1, "body": "x y"}], fields=("n", "body"))
    assert list(load_documents(Corpus(str(body), text_field="body"), "all")) == ["x y"]


def test_a_csv_without_the_text_column_is_refused_naming_its_columns(tmp_path, capsys):
    path = write_csv(tmp_path / "rows.csv", [{"id": 1, "body": "hello"}], fields=("id", "body"))
    with pytest.raises(SurgeryError) as err:
        TokenBlocks(data=str(path), tokenizer=MODEL, block_size=16, val_fraction=0.5).setup("fit")
    assert str(err.value) == (f"{path} has no column 'text' (its columns: 'id', 'body'); "
                              "set data.init_args.text_field to the column that holds the text")
    code, _, err_text = command(capsys, "eval", MODEL, "--data", str(path), "--block-size", "2")
    assert code == 2 and (f"surgery eval: error: {path} has no column 'text' (its columns: 'id', 'body'); pass "
                          "--text-field with the column that holds the text") in err_text
    code, _, _ = command(capsys, "eval", MODEL, "--data", str(path), "--block-size", "2", "--text-field", "body")
    assert code == 0
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SurgeryError, match="empty.csv is empty: a .csv corpus needs a header row naming its columns, one of them 'text'"):
        list(load_documents(Corpus(str(tmp_path / "empty.csv")), "all"))


@pytest.mark.parametrize("name, what", [("notes.md", "a .md file"), ("LICENSE", "a file with no extension")])
def test_a_single_file_of_another_extension_is_refused_by_name(tmp_path, capsys, name, what):
    (tmp_path / name).write_text("some text\n" * 50)
    message = (f"data file '{tmp_path / name}' is {what}, which surgery does not read: pass a .txt, .jsonl, .parquet "
               "or .csv file (plain text: rename it to .txt")
    with pytest.raises(SurgeryError, match=re.escape(message)):
        TokenBlocks(data=str(tmp_path / name), tokenizer=MODEL)
    code, _, err = command(capsys, "eval", MODEL, "--data", str(tmp_path / name))
    assert code == 2 and f"surgery eval: error: {message}" in err


def test_a_directory_without_a_readable_file_names_what_it_holds(tmp_path, capsys):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for name in ("a.md", "sub/b.md", "page.html", "README"):
        (root / name).write_text("text\n" * 100)
    (root / ".hidden.txt").write_text("hidden\n")  # hidden files are not data
    message = (f"data directory '{root}' has no file surgery reads (its 4 files are 2 .md, 1 with no extension, 1 .html: "
               "README, a.md, page.html, sub/b.md; hidden files are ignored): surgery reads .txt, .jsonl, .parquet or .csv files")
    for argv in (["eval", MODEL, "--data", str(root)], ["verify", MODEL, "--out", str(tmp_path / "v"), "--data", str(root)]):
        code, _, err = command(capsys, *argv)
        assert code == 2 and f"surgery {argv[0]}: error: {message}" in err and "0 tokens" not in err
    with pytest.raises(SurgeryError, match=re.escape(message)):
        TokenBlocks(data=str(root), tokenizer=MODEL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurgeryError, match=re.escape(f"data directory '{tmp_path / 'empty'}' has no file surgery reads (it holds no files;")):
        Corpus(str(tmp_path / "empty")).files()


def test_a_directory_with_a_mix_reads_its_data_files_and_names_the_others_once(tmp_path, caplog):
    root = tmp_path / "mixed"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref\n")
    (root / "a.txt").write_text("alpha\n")
    write_csv(root / "b.csv", [{"id": 1, "text": "beta"}])
    (root / "README.md").write_text("# about\n")
    (root / "LICENSE").write_text("MIT\n")
    corpus = Corpus(str(root))
    assert sorted(load_documents(corpus, "all")) == ["alpha\n", "beta"]
    corpus.files()
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert warnings == [f"data directory '{root}': 2 of 4 files left out, as surgery reads only .txt, .jsonl, .parquet or "
                        ".csv files (1 with no extension, 1 .md: LICENSE, README.md)"]


# -- 5. a split too small: the cause, and the fix in the command's own flags ---------------------------------------

def train_only_directory(root: Path) -> Path:
    """Three files that the 2% validation hash all puts on the training side."""
    root.mkdir()
    names = [n for n in (f"part{i}.txt" for i in range(20)) if not _is_validation(n, 0.02)][:3]
    for name in names:
        book(root / name, lines=30)
    return root


def test_eval_of_a_directory_whose_files_all_train_names_the_cause_and_split_all(tmp_path, capsys):
    root = train_only_directory(tmp_path / "corpus")
    code, _, err = command(capsys, "eval", MODEL, "--data", str(root), "--block-size", "32", "--split", "validation")
    assert code == 2
    assert (f"surgery eval: error: the validation split of '{root}' has 0 tokens, fewer than one block of 32 (none of its "
            "3 files falls in the validation split: a hash of each file's path holds about 2% of them out): pass --split all "
            "to score the whole input") in err
    assert "data." not in err
    assert command(capsys, "eval", MODEL, "--data", str(root), "--block-size", "32")[0] == 0  # the default: all of it


def test_training_on_that_directory_keeps_naming_the_data_settings(tmp_path):
    root = train_only_directory(tmp_path / "corpus")
    with pytest.raises(SurgeryError) as err:
        TokenBlocks(data=str(root), tokenizer=MODEL, block_size=32).split("validation")
    assert str(err.value) == (
        f"the validation split of '{root}' has 0 tokens, fewer than one block of 32: add text, lower data.block_size or "
        "raise data.val_fraction (none of its 3 files falls in the validation split: a hash of each file's path holds "
        "about 2% of them out)")


def test_eval_of_text_shorter_than_a_block_names_block_size(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("x = 1\n")
    n = tokens_of(["x = 1\n"])
    code, _, err = command(capsys, "eval", MODEL, "--data", str(tmp_path / "short.txt"))
    assert code == 2 and (f"surgery eval: error: '{tmp_path / 'short.txt'}' has {n} tokens, fewer than one block of 256: "
                          f"pass --block-size {n} or less") in err
    text = book(tmp_path / "book.txt", lines=30)
    code, _, err = command(capsys, "eval", MODEL, "--data", str(text), "--split", "validation", "--block-size", "64")
    assert code == 2 and "fewer than one block of 64 (the validation split is its last 2% of text, cut at a line start): " \
                         "pass --split all to score the whole input or --block-size" in err and "data." not in err


def test_verify_of_text_shorter_than_a_block_names_its_flags(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("x = 1\n")
    n = tokens_of(["x = 1\n"])
    code, _, err = command(capsys, "verify", MODEL, "--out", str(tmp_path / "v"), "--data", str(tmp_path / "short.txt"))
    assert code == 2 and (f"surgery verify: error: '{tmp_path / 'short.txt'}' has {n} tokens, fewer than one block of "
                          f"128: pass --block-size {n} or less") in err
    assert "data." not in err
