"""Multi-step arithmetic word problems with an integer answer."""

from __future__ import annotations

import random

from pm_ray.data.generators.common import Row

NAMES = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Farah",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
    "Milo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "eggs"]
INSTRUCTION = "Solve the word problem. Answer with the final number only."


def arithmetic_row(rng: random.Random) -> Row:
    """start + gained - lost (two steps, numbers below 20); the answer is always positive.

    (A first version with a multiplication step, start + boxes * per_box - lost, was near 0 after
    50 LoRA steps in a probe: 1 of 32 test rows.)"""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, 19)
    gained = rng.randint(2, 19)
    lost = rng.randint(1, start + gained - 1)
    text = (
        f"{name} has {start} {item}. {name} buys {gained} more {item}, "
        f"then gives away {lost} {item}. How many {item} does {name} have now?"
    )
    return {"instruction": INSTRUCTION, "input": text, "output": str(start + gained - lost)}
