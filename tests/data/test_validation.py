"""The validation split carved from the training rows (choose on validation, report test)."""

from __future__ import annotations

import collections

import pyarrow as pa
import pytest

from pm_ray.config import ConfigError, config_from_dict
from pm_ray.data.readers import make_task
from pm_ray.data.schema import TaskDataError
from pm_ray.data.validation import carve_validation


def mc_task(n_train: int = 60, n_test: int = 12):
    def rows(n: int, tag: str) -> pa.Table:
        labels = ["yes", "no", "maybe"]
        return pa.Table.from_pylist(
            [
                {"instruction": "Answer.", "input": f"{tag} {i}", "output": labels[i % 3], "choices": labels}
                for i in range(n)
            ]
        )

    return make_task("mc", "instruction", rows(n_train, "train"), rows(n_test, "test"))


def test_both_splits_train_on_the_same_rows_and_validation_comes_from_train() -> None:
    task = mc_task()
    on_test = carve_validation(task, 15, seed=0, evaluate_on="test")
    on_val = carve_validation(task, 15, seed=0, evaluate_on="validation")
    assert on_test.train.equals(on_val.train) and on_test.train.num_rows == 45
    assert on_test.test.equals(task.test)  # the test rows are untouched
    train_inputs = {r["input"] for r in task.train.to_pylist()}
    held = [r["input"] for r in on_val.test.to_pylist()]
    assert len(held) == 15 and set(held) <= train_inputs
    assert not set(held) & {r["input"] for r in on_val.train.to_pylist()}
    assert collections.Counter(r["output"] for r in on_val.test.to_pylist()) == {"yes": 5, "no": 5, "maybe": 5}
    again = carve_validation(task, 15, seed=0, evaluate_on="validation")
    assert again.test.equals(on_val.test) and again.train.equals(on_val.train)
    assert not carve_validation(task, 15, seed=1, evaluate_on="validation").test.equals(on_val.test)
    assert carve_validation(task, 0, seed=0, evaluate_on="test") is task


def test_bad_validation_settings_name_the_field(tmp_path) -> None:
    with pytest.raises(TaskDataError, match=r"tasks.validation_rows=60.*'mc' has 60 training rows"):
        carve_validation(mc_task(), 60, seed=0, evaluate_on="test")
    with pytest.raises(ConfigError, match="eval.split=validation needs tasks.validation_rows > 0") as err:
        config_from_dict({"eval": {"split": "validation"}, "storage": {"path": str(tmp_path)}})
    assert str(err.value).count("\n") == 0 and "got {" not in str(err.value)  # one line, no config dump
    cfg = config_from_dict({"eval": {"split": "validation"}, "tasks": {"validation_rows": 20}})
    assert cfg.eval.split == "validation" and cfg.tasks.validation_rows == 20
