"""BIG-bench `task.json` files as instruction rows, read straight from the PyPI sdist (never executed).

A BIG-bench JSON task (github.com/google/BIG-bench, `docs/doc.md`) is
    {"task_prefix": str?, "append_choices_to_input": bool?, "examples": [
        {"input": str, "target": str | [str]}                       # generation
        {"input": str, "target_scores": {choice: score, ...}}       # multiple choice
    ]}
Row mapping: instruction = task_prefix (or the task's description when it has none), input =
example input, and
- multiple choice: choices = the target_scores keys in file order, output = the unique best-scored
  choice. BIG-bench appends the choices to the input unless the task sets
  `append_choices_to_input: false` (its default is true); `choices_in_prompt` honours that by
  default ("auto") and can force either way. The appended text is BIG-bench's own
  (`"\n  choice: " + choice` for each choice).
- generation: output = the first target, references = all targets (exact match against any).

The archive is `bigbench-1.0.0.tar.gz` from PyPI; its setup.py is broken and nothing in it is run:
`fetch_archive` downloads the file from the package registry (sha256 checked) and members are read
with `tarfile`. `read_tasks` reads each task.json out of it once per machine (one streaming pass for
all the tasks asked for) and keeps it beside the archive, so a run does not decompress 342 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.data.schema import TaskDataError

ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
ARCHIVE_SPEC = "bigbench==1.0.0"
ARCHIVE_PROJECT = "bigbench"
DEFAULT_INDEX = "https://pypi.org/simple"
TASKS_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
BIGBENCH_CHOICE_PREFIX = "\n  choice: "  # BIG-bench's json_task default
ChoicesInPrompt = Literal["auto", "list", "hide"]
InstructionPart = Literal["full", "prompt"]
NI_PROMPT_MARK = "Prompt:"


def cache_root() -> Path:
    """Where downloaded archives and built suites live: $PM_RAY_CACHE or ~/.cache/pm-ray."""
    return Path(os.environ.get("PM_RAY_CACHE") or Path.home() / ".cache" / "pm-ray")


def archive_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root() / "archives") / ARCHIVE_NAME


def index_url() -> str:
    """The package registry's simple index: $PIP_INDEX_URL (as pip reads it) or PyPI."""
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def _archive_listing(index: str) -> tuple[str, str]:
    """(download url, sha256) of ARCHIVE_NAME from the registry's PEP 691 JSON listing."""
    url = f"{index}/{ARCHIVE_PROJECT}/"
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60, context=_ssl_context()) as response:
        listing = json.loads(response.read())
    for entry in listing.get("files", []):
        if entry.get("filename") == ARCHIVE_NAME and entry.get("hashes", {}).get("sha256"):
            return urllib.parse.urljoin(url, entry["url"]), entry["hashes"]["sha256"]
    raise TaskDataError(url, f"the registry lists no {ARCHIVE_NAME} with a sha256 hash")


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)


def fetch_archive(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """The BIG-bench sdist, downloaded once per machine into the cache.

    The file comes straight from the package registry (its PEP 691 listing gives the url and the
    sha256, which is checked), so no installer prepares its metadata and nothing in it is run. The
    download goes to a temporary name and is renamed into place only once its hash matches.
    """
    path = archive_path(cache_dir)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    index = index_url()
    if not quiet:
        print(
            f"pm-ray: downloading {ARCHIVE_NAME} (342 MB, once per machine) from {index} into {path.parent}",
            file=sys.stderr,
            flush=True,
        )
    tmp = path.parent / f".{ARCHIVE_NAME}.{os.getpid()}.part"
    try:
        url, want = _archive_listing(index)
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=120, context=_ssl_context()) as response:
            with open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        if digest.hexdigest() != want:
            raise TaskDataError(url, f"sha256 {digest.hexdigest()} does not match the registry's {want}")
        os.replace(tmp, path)
    except TaskDataError:
        raise
    except (OSError, ValueError) as err:  # URLError is an OSError; bad JSON is a ValueError
        raise TaskDataError(ARCHIVE_SPEC, f"could not download the BIG-bench archive from {index}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _archive_members(archive: Path, tasks: list[str]) -> dict[str, bytes]:
    """{task: raw task.json bytes} for `tasks`, in one streaming pass over the archive (a gzip tar
    is read front to back once: random access would decompress it again for every seek)."""
    members = {f"{TASKS_ROOT}/{t}/task.json": t for t in tasks}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|gz") as tf:
            for member in tf:
                task = members.get(member.name)
                if task is None or not member.isfile():
                    continue
                handle = tf.extractfile(member)
                assert handle is not None
                found[task] = handle.read()
                if len(found) == len(members):
                    break
    except (tarfile.TarError, OSError, EOFError) as err:
        raise TaskDataError(str(archive), f"cannot read the BIG-bench archive: {err}") from err
    missing = [t for t in tasks if t not in found]
    if missing:
        raise TaskDataError(str(archive), f"no task.json for {missing} under {TASKS_ROOT}/")
    return found


def read_archive_tasks(archive: Path, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """{task: parsed task.json} for `tasks` (e.g. "fact_checker/fever"), in one pass over the archive."""
    return {
        task: _parse(raw, f"{archive}:{TASKS_ROOT}/{task}/task.json")
        for task, raw in _archive_members(archive, tasks).items()
    }


def members_dir(archive: Path) -> Path:
    """Where the task.json files read out of `archive` are kept (beside it, once per machine)."""
    return archive.parent / f"{archive.name}.tasks"


def read_tasks(tasks: list[str], archive: Path | None = None) -> dict[str, dict[str, Any]]:
    """{task: parsed task.json}: each task.json is read out of the (sha256-checked) archive once per
    machine, in one pass for all the tasks not read before, and kept as a file in `members_dir`
    (written atomically); later runs read those files and never open the 342 MB archive."""
    archive = archive or fetch_archive()
    kept = members_dir(archive)
    paths = {task: kept / task / "task.json" for task in tasks}
    missing = [task for task, path in paths.items() if not path.is_file()]
    if missing:
        for task, raw in _archive_members(archive, missing).items():
            paths[task].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(paths[task], raw)
    return {task: _parse(path.read_bytes(), str(path)) for task, path in paths.items()}


def read_task_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TaskDataError(str(p), "file does not exist" if not p.exists() else "not a file")
    return _parse(p.read_bytes(), str(p))


def _parse(raw: bytes, source: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskDataError(source, f"cannot parse as JSON: {err}") from err
    if not isinstance(data, dict):
        raise TaskDataError(source, f"expected a BIG-bench task object with 'examples', got {type(data).__name__}")
    return data


def ni_prompt(prefix: str, source: str) -> str:
    """The short `Prompt:` section of a Natural Instructions v1 prefix ("Definition: ... Things to
    Avoid: ... Emphasis/Caution: ... Prompt: <one line>"), for CPU-sized prompts."""
    head, mark, tail = prefix.rpartition(NI_PROMPT_MARK)
    if not mark or not tail.strip():
        raise TaskDataError(
            source, f"instruction_part='prompt' needs a Natural Instructions prefix with a {NI_PROMPT_MARK!r} section"
        )
    return tail.strip()


def bigbench_rows(
    task: dict[str, Any],
    *,
    source: str,
    choices_in_prompt: ChoicesInPrompt = "auto",
    instruction_part: InstructionPart = "full",
) -> list[dict[str, Any]]:
    """Instruction rows (instruction, input, output, and choices or references) of one task.json.

    instruction_part="prompt" keeps only the `Prompt:` line of a Natural Instructions prefix."""
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise TaskDataError(
            source,
            "expected a non-empty list 'examples' (a BIG-bench JSON task; "
            "programmatic tasks have no task.json examples)",
        )
    prefix = task.get("task_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise TaskDataError(source, f"'task_prefix' must be a string, got {type(prefix).__name__}")
    instruction = (prefix or "").strip() or str(task.get("description") or "").strip()
    if instruction_part == "prompt":
        instruction = ni_prompt(instruction, source)
    if not instruction:
        raise TaskDataError(source, "no instruction: the task has neither 'task_prefix' nor 'description'")
    append = (
        bool(task.get("append_choices_to_input", True)) if choices_in_prompt == "auto" else choices_in_prompt == "list"
    )
    rows = [_row(ex, i, instruction, append, source) for i, ex in enumerate(examples)]
    kinds = {"choices" in r for r in rows}
    if len(kinds) > 1:
        first = next(i for i, r in enumerate(rows) if ("choices" in r) != ("choices" in rows[0]))
        raise TaskDataError(
            source,
            "mixes multiple-choice ('target_scores') and generation ('target') examples; a task is one or the other",
            row=first,
        )
    return rows


def _row(ex: Any, i: int, instruction: str, append: bool, source: str) -> dict[str, Any]:
    where = f"{source}, example {i}"
    if not isinstance(ex, dict):
        raise TaskDataError(where, f"expected an object, got {type(ex).__name__}")
    text = ex.get("input")
    if not isinstance(text, str) or not text.strip():
        raise TaskDataError(where, f"'input' must be a non-empty string, got {text!r}")
    scores = ex.get("target_scores")
    if scores is not None:
        return _choice_row(scores, text, instruction, append, where)
    target = ex.get("target")
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise TaskDataError(
            where, f"expected 'target' (a string or list of strings) or 'target_scores', got target={target!r}"
        )
    return {
        "instruction": instruction,
        "input": text.strip(),
        "output": targets[0].strip(),
        "references": [t.strip() for t in targets],
    }


def _choice_row(scores: Any, text: str, instruction: str, append: bool, where: str) -> dict[str, Any]:
    if (
        not isinstance(scores, dict)
        or len(scores) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values())
    ):
        raise TaskDataError(where, f"'target_scores' must map at least 2 choices to numbers, got {scores!r}")
    best = max(scores.values())
    winners = [c for c, v in scores.items() if v == best]
    if len(winners) != 1 or best <= 0:
        raise TaskDataError(
            where, f"'target_scores' needs exactly one best choice with a positive score, got {scores!r}"
        )
    choices = [c.strip() for c in scores]
    if len(set(choices)) != len(choices) or not all(choices):
        raise TaskDataError(where, f"choices must be distinct non-empty strings, got {list(scores)!r}")
    body = text.strip()
    if append:
        body += BIGBENCH_CHOICE_PREFIX + BIGBENCH_CHOICE_PREFIX.join(choices)
    return {"instruction": instruction, "input": body, "output": winners[0].strip(), "choices": choices}
