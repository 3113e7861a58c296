from __future__ import annotations

import random
import re

from pm_ray.data.generators.arithmetic import arithmetic_row
from pm_ray.data.generators.common import unique_rows
from pm_ray.data.generators.python_output import python_output_row
from pm_ray.data.generators.weekday import WEEKDAYS, weekday_row


def test_arithmetic_answers_recomputed_from_text():
    for row in unique_rows(arithmetic_row, random.Random(0), 200):
        start, gained, lost = map(int, re.findall(r"\d+", row["input"]))
        assert int(row["output"]) == start + gained - lost > 0


def test_weekday_answers_by_counting_days_one_by_one():
    for row in unique_rows(weekday_row, random.Random(1), 200):
        named = next(i for i, d in enumerate(WEEKDAYS) if f" {d}." in row["input"])
        today = {"Today": named, "Yesterday": named + 1, "Tomorrow": named - 1}[row["input"].split(" ")[0]]
        days = int(re.findall(r"\d+", row["input"])[0])
        step = -1 if "ago" in row["input"] else 1
        day = today % 7
        for _ in range(days):
            day = (day + step) % 7
        assert row["output"] == WEEKDAYS[day]


def test_python_snippets_run_to_their_answer_in_a_fresh_interpreter(tmp_path):
    import subprocess
    import sys

    rows = unique_rows(python_output_row, random.Random(2), 40)
    program = "\n".join(f"print('#{i}')\n{r['input']}" for i, r in enumerate(rows))
    (tmp_path / "p.py").write_text(program)
    out = subprocess.run([sys.executable, str(tmp_path / "p.py")], capture_output=True, text=True, check=True).stdout
    chunks = re.split(r"^#\d+\n", out, flags=re.M)[1:]
    assert [c.strip() for c in chunks] == [r["output"] for r in rows]


def test_generators_are_deterministic_and_unique():
    for make in (arithmetic_row, weekday_row, python_output_row):
        a = unique_rows(make, random.Random(5), 300)
        assert a == unique_rows(make, random.Random(5), 300)
        assert a != unique_rows(make, random.Random(6), 300)
        assert len({(r["instruction"], r["input"]) for r in a}) == 300
