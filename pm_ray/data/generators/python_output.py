"""Output prediction for small generated Python snippets; the truth comes from executing them."""

from __future__ import annotations

import contextlib
import io
import random

from pm_ray.data.generators.common import Row

INSTRUCTION = "What does this Python program print? Answer with the printed output only."
VARS = ["a", "b", "c", "x", "y", "n", "k", "total"]


def _arith_snippet(rng: random.Random) -> str:
    v1, v2 = rng.sample(VARS, 2)
    lines = [f"{v1} = {rng.randint(1, 12)}", f"{v2} = {rng.randint(1, 12)}"]
    op = rng.choice(["+", "-", "*"])
    lines.append(f"{v1} = {v1} {op} {v2}")
    lines.append(f"print({v1} {rng.choice(['+', '-'])} {rng.randint(1, 9)})")
    return "\n".join(lines)


def _loop_snippet(rng: random.Random) -> str:
    v = rng.choice(["s", "total", "acc"])
    start, stop, step = rng.randint(0, 4), rng.randint(5, 9), rng.choice([1, 2])
    return f"{v} = 0\nfor i in range({start}, {stop}, {step}):\n    {v} += i\nprint({v})"


def _string_snippet(rng: random.Random) -> str:
    word = rng.choice(["python", "merge", "token", "model", "train", "ray", "lora", "adapter", "stream", "task"])
    expr = rng.choice(
        [
            f"'{word}'.upper()",
            f"'{word}'[::-1]",
            f"'{word}'[:{rng.randint(1, 4)}]",
            f"len('{word}') * {rng.randint(2, 5)}",
            f"'{word}' + '{rng.randint(1, 99)}'",
        ]
    )
    return f"print({expr})"


def _list_snippet(rng: random.Random) -> str:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    expr = rng.choice(["max(xs)", "min(xs)", "sum(xs)", "len(xs)", "xs[-1]", "sorted(xs)[1]"])
    return f"xs = {xs}\nprint({expr})"


SNIPPETS = (_arith_snippet, _loop_snippet, _string_snippet, _list_snippet)


def run_snippet(code: str) -> str:
    """Execute a generated snippet (our own code, never input data) and return its stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(
            compile(code, "<snippet>", "exec"),
            {
                "__builtins__": {
                    "print": print,
                    "len": len,
                    "max": max,
                    "min": min,
                    "sum": sum,
                    "range": range,
                    "sorted": sorted,
                }
            },
        )
    return buf.getvalue().strip()


def python_output_row(rng: random.Random) -> Row:
    code = rng.choice(SNIPPETS)(rng)
    return {"instruction": INSTRUCTION, "input": code, "output": run_snippet(code)}
