"""SuperNI / Natural Instructions v2 task JSON (github.com/allenai/natural-instructions) as rows.

    {"Definition": [str] | str, "Positive Examples": [{"input", "output", "explanation"}],
     "Instances": [{"id": str, "input": str, "output": [str, ...]}], ...}

Row mapping: instruction = the Definition (list items joined by a blank line), input = the
instance input, output = the first listed output, references = every listed output (exact match
against any, as SuperNI's evaluation does). `positive_examples` > 0 prepends that many of the
task's positive examples to the instruction (SuperNI's "Def + k pos." prompt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pm_ray.data.schema import TaskDataError


def read_superni(path: str | Path, *, positive_examples: int = 0) -> list[dict[str, Any]]:
    p = Path(path)
    source = str(p)
    if not p.is_file():
        raise TaskDataError(source, "file does not exist" if not p.exists() else "not a file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskDataError(source, f"cannot parse as JSON: {err}") from err
    return superni_rows(data, source=source, positive_examples=positive_examples)


def _definition(data: dict[str, Any], source: str) -> str:
    definition = data.get("Definition")
    parts = [definition] if isinstance(definition, str) else definition
    if not isinstance(parts, list) or not all(isinstance(s, str) for s in parts) or not "".join(parts).strip():
        raise TaskDataError(source, f"'Definition' must be a non-empty string or list of strings, got {definition!r}")
    return "\n\n".join(s.strip() for s in parts if s.strip())


def _demonstrations(data: dict[str, Any], count: int, source: str) -> str:
    examples = data.get("Positive Examples") or []
    if not isinstance(examples, list) or len(examples) < count:
        raise TaskDataError(
            source,
            f"positive_examples={count} but the task has "
            f"{len(examples) if isinstance(examples, list) else 0} 'Positive Examples'",
        )
    lines = []
    for k, ex in enumerate(examples[:count]):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
            raise TaskDataError(
                f"{source}, positive example {k}", "expected an object with string 'input' and 'output'"
            )
        lines.append(f"Positive Example {k + 1} -\nInput: {ex['input'].strip()}\nOutput: {ex['output'].strip()}")
    return "\n\n".join(lines)


def superni_rows(data: Any, *, source: str, positive_examples: int = 0) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        raise TaskDataError(
            source, f"expected a SuperNI task object with 'Definition' and 'Instances', got {type(data).__name__}"
        )
    instruction = _definition(data, source)
    if positive_examples:
        instruction = f"{instruction}\n\n{_demonstrations(data, positive_examples, source)}"
    instances = data.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise TaskDataError(source, "expected a non-empty list 'Instances'")
    rows = []
    for i, inst in enumerate(instances):
        where = f"{source}, instance {i}"
        if not isinstance(inst, dict):
            raise TaskDataError(where, f"expected an object, got {type(inst).__name__}")
        text, outputs = inst.get("input"), inst.get("output")
        if not isinstance(text, str) or not text.strip():
            raise TaskDataError(where, f"'input' must be a non-empty string, got {text!r}")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise TaskDataError(where, f"'output' must be a non-empty list of strings, got {outputs!r}")
        rows.append(
            {
                "instruction": instruction,
                "input": text.strip(),
                "output": outputs[0].strip(),
                "references": [o.strip() for o in outputs],
            }
        )
    return rows
