"""Write a directory atomically: build it under a temporary name beside the target, fsync its
files, then rename it into place, so readers see the old directory (or none) or the new one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``target``. An existing empty ``target``
    is replaced; a non-empty one only with ``replace=True``. On any error the temporary is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            if replace:
                shutil.rmtree(target)
            else:
                target.rmdir()  # empty (callers check); raises if not
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
