"""Replace a generated block (between `<!-- NAME:start -->` and `<!-- NAME:end -->`) in a doc file."""

from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, name: str, block: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{block}\n{end}{tail}")
