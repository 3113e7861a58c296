"""Weekday arithmetic: which day of the week it is N days after (or before) a given day."""

from __future__ import annotations

import random

from pm_ray.data.generators.common import Row

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
INSTRUCTION = "Answer with the name of the day of the week only."
# (phrase, offset of today from the named day): "Yesterday was Monday" means today is Tuesday.
ANCHORS: tuple[tuple[str, int], ...] = (("Today is", 0), ("Yesterday was", 1), ("Tomorrow is", -1))


def weekday_row(rng: random.Random) -> Row:
    named = rng.randrange(7)
    phrase, offset = rng.choice(ANCHORS)
    today = (named + offset) % 7
    days = rng.randint(1, 30)
    if rng.random() < 0.3:
        question = f"{phrase} {WEEKDAYS[named]}. What day of the week was it {days} days ago?"
        answer = WEEKDAYS[(today - days) % 7]
    else:
        question = f"{phrase} {WEEKDAYS[named]}. What day of the week will it be in {days} days?"
        answer = WEEKDAYS[(today + days) % 7]
    return {"instruction": INSTRUCTION, "input": question, "output": answer}
