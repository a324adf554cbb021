"""Corpora, the train/validation split, packed token blocks and the on-disk token cache."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from surgery.data import TokenBlocks
from surgery.data.corpus import Corpus, _is_validation, load_documents
from surgery.data.tokenizer import get_tokenizer
from surgery.errors import SurgeryError

TOKENIZER = str(Path(__file__).parents[1] / "checkpoints" / "tiny-gpt2-stdlib")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))


def write_corpus(root: Path, n_files: int = 40) -> Path:
    root.mkdir()
    for i in range(n_files):
        (root / f"doc{i:02d}.txt").write_text(f"def function_{i}(x):\n    return x * {i}\n" * (5 + i % 3))
    return root


def test_stdlib_split_is_by_file_disjoint_and_stable():
    corpus = Corpus("stdlib")
    files = corpus.files()
    assert len(files) > 500 and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    val = list(load_documents(corpus, "validation"))
    assert 0.005 * len(files) < len(val) < 0.05 * len(files)
    assert val == list(load_documents(Corpus("stdlib"), "validation"))  # the same on every call and machine
    root = corpus.root()
    held = [f for f in files if _is_validation(f.relative_to(root).as_posix(), 0.02)]
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in held]
    assert val == [t for t in texts if t.strip() and "\ufffd" not in t]  # non-UTF-8 files skipped


def test_local_text_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(50)))
    rows = list(load_documents(Corpus(str(tmp_path / "a.jsonl"), val_fraction=0.2, text_field="body"), "train"))
    held = list(load_documents(Corpus(str(tmp_path / "a.jsonl"), val_fraction=0.2, text_field="body"), "validation"))
    assert sorted(rows + held, key=lambda r: int(r.split()[1])) == [f"row {i}" for i in range(50)] and 0 < len(held) < 25
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta", ""]}), tmp_path / "b.parquet")
    docs = list(load_documents(Corpus(str(tmp_path / "b.parquet"), val_fraction=0.0), "train"))
    assert docs == ["alpha", "beta"]  # empty documents dropped


def test_a_missing_data_path_names_the_choices():
    with pytest.raises(SurgeryError, match="data path './no/such/dir' does not exist; use 'stdlib'"):
        TokenBlocks(data="./no/such/dir")


def test_blocks_are_packed_with_end_of_text_between_documents(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    dm = TokenBlocks(data=str(root), tokenizer=TOKENIZER, block_size=32, batch_size=4, val_fraction=0.1)
    tok = dm.tokenizer
    train = dm.split("train")
    docs = list(load_documents(dm.corpus, "train"))
    expected = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(train) == len(expected) // 32
    flat = np.concatenate([train[i].numpy() for i in range(len(train))])
    assert flat.tolist() == expected[: len(train) * 32]
    assert train[0].shape == (32,) and train[0].dtype.is_floating_point is False
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch.shape) == (4, 32)


def test_training_order_follows_the_run_seed_and_is_restored_from_a_checkpoint(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "corpus")

    def first_batches(seed=None, state=None):
        dm = TokenBlocks(data=str(root), tokenizer=TOKENIZER, block_size=16, batch_size=4, val_fraction=0.1, seed=seed)
        if state is not None:
            dm.load_state_dict(state)
        return dm, [b.tolist() for b, _ in zip(dm.train_dataloader(), range(3))]

    monkeypatch.setenv("PL_GLOBAL_SEED", "1")  # what seed_everything(1) sets
    dm1, order1 = first_batches()
    assert dm1.state_dict() == {"order_seed": 1}
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    assert first_batches()[1] != order1  # another run seed, another order
    assert first_batches(seed=1)[1] == order1  # an explicit data seed wins over the run's
    dm, order = first_batches(state=dm1.state_dict())  # a restart that drew seed 2 resumes seed 1's order
    assert order == order1 and dm.state_dict() == {"order_seed": 1}


def test_tokens_are_cached_and_reused(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "corpus")
    TokenBlocks(data=str(root), tokenizer=TOKENIZER, block_size=16, val_fraction=0.1).setup("fit")
    cached = sorted((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert [p.name.rsplit("-", 1)[1] for p in cached] == ["train.npy", "validation.npy"]
    mtimes = [p.stat().st_mtime_ns for p in cached]

    import surgery.data.datamodule as datamodule

    monkeypatch.setattr(datamodule, "load_documents", lambda *a: pytest.fail("tokenized again"))
    TokenBlocks(data=str(root), tokenizer=TOKENIZER, block_size=16, val_fraction=0.1).setup("fit")
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    (root / "doc00.txt").write_text("changed\n")  # an edited corpus is tokenized afresh
    os.utime(root / "doc00.txt", (1, 1))
    with pytest.raises(pytest.fail.Exception, match="tokenized again"):
        TokenBlocks(data=str(root), tokenizer=TOKENIZER, block_size=16, val_fraction=0.1).setup("fit")


def test_a_corpus_too_small_for_one_block_says_what_to_change(tmp_path):
    (tmp_path / "tiny.txt").write_text("x = 1\n")
    dm = TokenBlocks(data=str(tmp_path / "tiny.txt"), tokenizer=TOKENIZER, block_size=256, val_fraction=0.0)
    with pytest.raises(SurgeryError, match="fewer than one block of 256: add text, lower data.block_size"):
        dm.split("train")


def test_bpe_tokenizer_is_trained_on_the_corpus_and_cached(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    tok = get_tokenizer("bpe-300", Corpus(str(root)))
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>"
    text = "def function_7(x):\n    return x * 7\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(text)["input_ids"]) < len(text) / 2  # merges learned from the corpus
    again = get_tokenizer("bpe-300", Corpus(str(root)))
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_hub_datasets_stream_both_splits_from_the_same_first_rows(monkeypatch):
    import datasets

    read = []

    def fake_stream(name, config, split, streaming):
        assert (name, config, split, streaming) == ("owner/web", "en", "train", True)
        for i in range(10_000):
            read.append(i)
            yield {"text": f"document {i}"}

    monkeypatch.setattr(datasets, "load_dataset", fake_stream)
    corpus = Corpus("owner/web:en", val_fraction=0.1, max_documents=300)
    train, val = list(load_documents(corpus, "train")), list(load_documents(corpus, "validation"))
    assert len(train) + len(val) == 300 and 10 < len(val) < 60 and len(read) == 600
    assert not set(train) & set(val)


def test_an_unreachable_hub_dataset_says_how_to_work_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SurgeryError, match="could not stream Hub dataset 'openwebtext'.*use --data stdlib"):
        list(load_documents(Corpus("openwebtext"), "train"))


def test_a_single_text_file_is_split_by_lines(tmp_path):
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)]
    (tmp_path / "book.txt").write_text("".join(lines))
    corpus = Corpus(str(tmp_path / "book.txt"), val_fraction=0.1)
    [train], [val] = list(load_documents(corpus, "train")), list(load_documents(corpus, "validation"))
    assert train + val == "".join(lines)  # nothing lost, nothing shared
    assert val.startswith("line 180: ") and train.endswith("dog\n")  # the last 10%, cut at a line start
    dm = TokenBlocks(data=str(tmp_path / "book.txt"), tokenizer=TOKENIZER, block_size=32, val_fraction=0.1)
    assert len(dm.split("train")) > 8 * len(dm.split("validation")) > 0  # both splits usable as given
    (tmp_path / "one_line.txt").write_text("word " * 400)  # no line breaks: cut where the share says
    one = Corpus(str(tmp_path / "one_line.txt"), val_fraction=0.25)
    [a], [b] = list(load_documents(one, "train")), list(load_documents(one, "validation"))
    assert a + b == "word " * 400 and len(b) == 500


def test_a_split_of_a_single_text_file_too_small_says_raise_val_fraction(tmp_path):
    (tmp_path / "book.txt").write_text("".join(f"line {i} of a short text\n" for i in range(60)))
    dm = TokenBlocks(data=str(tmp_path / "book.txt"), tokenizer=TOKENIZER, block_size=64, val_fraction=0.02)
    with pytest.raises(SurgeryError, match="the validation split of .*book.txt' has .* tokens, fewer than one block of 64: .*raise data.val_fraction"):
        dm.split("validation")
    dm = TokenBlocks(data=str(tmp_path / "book.txt"), tokenizer=TOKENIZER, block_size=64, val_fraction=0.3)
    assert len(dm.split("validation")) > 0  # and raising it helps


def non_utf8_corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(6):
        text = f"caf\u00e9 number {i}\n" * 20
        (root / f"{'latin' if i % 2 else 'utf8'}{i}.txt").write_bytes(text.encode("latin-1" if i % 2 else "utf-8"))
    return root


def test_non_utf8_files_are_refused_with_a_count(tmp_path):
    root = non_utf8_corpus(tmp_path / "corpus")
    dm = TokenBlocks(data=str(root), tokenizer=TOKENIZER, block_size=16, val_fraction=0.3)
    with pytest.raises(SurgeryError) as err:
        dm.split("train")
    assert str(err.value) == (
        f"3 of 6 files of data '{root}' are not UTF-8 (latin1.txt, latin3.txt, latin5.txt): convert them to UTF-8, or set "
        "data.init_args.encoding_errors to 'replace' (undecodable bytes become U+FFFD) or 'skip' (leave those files out)")


def test_non_utf8_files_skipped_or_replaced_on_request_are_counted(tmp_path, caplog):
    root = non_utf8_corpus(tmp_path / "corpus")
    docs = {}
    for mode in ("skip", "replace"):
        caplog.clear()
        corpus = Corpus(str(root), val_fraction=0.0, encoding_errors=mode)
        docs[mode] = list(load_documents(corpus, "train"))
        [record] = [r for r in caplog.records if "not UTF-8" in r.getMessage()]
        assert record.levelname == "WARNING" and "3 files that are not UTF-8" in record.getMessage()
        assert "latin1.txt, latin3.txt, latin5.txt" in record.getMessage()
    assert len(docs["skip"]) == 3 and all("caf\u00e9" in d for d in docs["skip"])
    assert len(docs["replace"]) == 6 and sum("caf\ufffd" in d for d in docs["replace"]) == 3
    assert Corpus("stdlib").decode_mode == "skip" and Corpus(str(root)).decode_mode == "refuse"
    with pytest.raises(SurgeryError, match="data.init_args.encoding_errors='ignore': choose one of refuse, skip, replace"):
        Corpus(str(root), encoding_errors="ignore")


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"rows.jsonl, line 2: not valid JSON \(Expecting ',' delimiter at column 13\); fix or delete the line"),
    (['{"text": "a"}', '', '{"body": "b", "id": 2}'], r"rows.jsonl, line 3: no field 'text' \(its fields: 'body', 'id'\); set data.init_args.text_field to the field that holds the text"),
    (['{"text": null}'], r"rows.jsonl, line 1: field 'text' holds null, not text"),
    (['["text", "a"]'], r"rows.jsonl, line 1: a JSON list, not an object with a 'text' field"),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, lines, message):
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    dm = TokenBlocks(data=str(tmp_path / "rows.jsonl"), tokenizer=TOKENIZER, block_size=16, val_fraction=0.5)
    with pytest.raises(SurgeryError, match=message):
        dm.setup("fit")


def test_a_parquet_file_without_the_text_column_names_its_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha"], "id": [1]}), tmp_path / "b.parquet")
    with pytest.raises(SurgeryError, match=r"b.parquet has no column 'text' \(its columns: 'body', 'id'\); set data.init_args.text_field"):
        list(load_documents(Corpus(str(tmp_path / "b.parquet")), "train"))
