"""Human-rated sentiment sentences from the VADER paper's data (Hutto & Gilbert, ICWSM 2014).

`hutto_ICWSM_2014/*_GroundTruth.txt` rows are `ID <tab> MEAN-RATING <tab> TEXT`; the mean is over at
least 20 raters on a -4 (extremely negative) .. +4 (extremely positive) scale. Four sources:
movie-review snippets (10,605), tweets (4,200), NYT editorial snippets (5,190), Amazon review snippets (3,708).

Labelling rule: mean >= +threshold -> positive (1); mean <= -threshold -> negative (0); sentences
in between are near-neutral and dropped. Default threshold 0.5 (half a scale point on average).
Split: a sentence is in the test split when a hash of `source:id` falls below `test_fraction`,
so the split never depends on order, threshold or which other sources are used.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

from surgery.errors import SurgeryError
from surgery.ln_tune.offline import vader_sdist

SOURCES = {"movies": "movieReviewSnippets", "tweets": "tweets", "nyt": "nytEditorialSnippets", "amazon": "amazonReviewSnippets"}
INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"


@dataclass(frozen=True)
class Sentence:
    source: str
    id: str
    rating: float  # mean human rating, -4 .. +4
    text: str


def read_ratings(sources: tuple[str, ...] = tuple(SOURCES)) -> list[Sentence]:
    """Every rated sentence of the given sources, in file order."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise SurgeryError(f"unknown sentiment source(s) {unknown}; choose from {list(SOURCES)}")
    with tarfile.open(vader_sdist()) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith(INNER)), None)
        if member is None:
            raise SurgeryError(f"{INNER} not found in the vaderSentiment source distribution")
        inner_bytes = outer.extractfile(member).read()
    out: list[Sentence] = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        files = {m.name.rsplit("/", 1)[-1]: m for m in inner.getmembers()}
        for source in sources:
            raw = inner.extractfile(files[f"{SOURCES[source]}_GroundTruth.txt"]).read().decode("utf-8-sig")
            for line in raw.splitlines():
                parts = line.split("\t")
                if len(parts) == 3 and parts[2].strip():
                    out.append(Sentence(source, parts[0].strip(), float(parts[1]), parts[2].strip()))
    return out


def label(rating: float, threshold: float) -> int | None:
    """1 positive, 0 negative, None near-neutral (|rating| < threshold)."""
    if rating >= threshold:
        return 1
    if rating <= -threshold:
        return 0
    return None


def is_test(sentence: Sentence, test_fraction: float) -> bool:
    digest = hashlib.sha256(f"{sentence.source}:{sentence.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def labelled_split(split: str, sources: tuple[str, ...] = tuple(SOURCES), threshold: float = 0.5,
                   test_fraction: float = 0.2) -> list[tuple[str, int]]:
    """(text, label) pairs of the "train" or "test" split, near-neutral sentences dropped, in file order."""
    if split not in ("train", "test"):
        raise SurgeryError(f"split must be 'train' or 'test', got {split!r}")
    if threshold <= 0:
        raise SurgeryError(f"the neutral threshold must be positive (got {threshold}); 0.5 drops |mean rating| < 0.5")
    pairs = []
    for s in read_ratings(sources):
        y = label(s.rating, threshold)
        if y is not None and is_test(s, test_fraction) == (split == "test"):
            pairs.append((s.text, y))
    return pairs
