"""Every command of the README's "Use" block runs, as written, on tiny models.

The block is parsed from README.md (an edited README is what is tested). The commands run in a copy
of the repository whose jobs/*.yaml are the real ones with tiny-model sizes laid over them (tiny
Llama, 2 quick tasks, engine=single; everything else, tracking included, as shipped), so a renamed
file, flag or config key fails here. `cluster/local_head.sh start` is replaced by the local head of
tests/localhead.py (its own ports: another Ray on this machine may hold 8265); the `jobs/submit.sh`
that follows runs as written against it (this is the suite's `ray job submit` test). A command this test does not know fails it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from localhead import local_head as start_local_head
from tinyconfig import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KNOWN = (
    "pm-ray run",
    "pm-ray compare",
    "pm-ray tune",
    "pm-ray report",
    "pm-ray eval",
    "pm-ray export",
    "cluster/local_head.sh start",
    "jobs/submit.sh",
)


def use_commands(readme: Path) -> list[str]:
    """The commands of the first ```bash block under '## Use', comments stripped, `&&` split."""
    text = readme.read_text()
    section = re.search(r"^## Use\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, f"{readme}: no '## Use' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), flags=re.S)
    assert block, f"{readme}: no bash block in the Use section"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.extend(part.strip() for part in line.split("&&"))
    return commands


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_sizes(storage: Path) -> dict[str, Any]:
    """The tiny-model sections of tests/tinyconfig.py, with the shipped tracking settings kept."""
    sizes = tiny_config(storage, tasks={"limit": 2})
    sizes.pop("tracking")
    return sizes


def make_workdir(root: Path) -> Path:
    """A copy of the repository (tracked files) with tiny-sized jobs/*.yaml."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    work = root / "repo"
    for name in files:
        src = REPO / name
        if src.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    sizes = tiny_sizes(work / "runs")  # = ./runs, absolute so that a job's working dir writes there too
    for name in ("quickstart.yaml", "tune_epsilon.yaml"):
        cfg = deep_update(yaml.safe_load((REPO / "jobs" / name).read_text()), sizes)
        if "search" in cfg:  # two grid points instead of four: the command is tested, not the search
            space = cfg["search"]["space"]
            key = next(iter(space))
            space[key]["grid"] = space[key]["grid"][:2]
        (work / "jobs" / name).write_text(yaml.safe_dump(cfg))
    return work


def state(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "state.json").read_text())


def check(command: str, proc: subprocess.CompletedProcess, work: Path) -> None:
    """What each command must have produced, beyond exit code 0."""
    argv = shlex.split(command)
    out = proc.stdout
    if argv[:2] == ["pm-ray", "run"]:
        config = yaml.safe_load((REPO / argv[2]).read_text())
        run_dir = work / "runs" / config["storage"]["run_name"]
        s = state(run_dir)
        assert s["completed"] == len(s["task_names"]) == 2 and s["metrics"]
        ran = yaml.safe_load((run_dir / "config.yaml").read_text())
        for override in argv[3:]:  # the README's dotted overrides were applied
            section, key = override.split("=")[0].split(".")
            assert str(ran[section][key]) == override.split("=")[1], override
        assert f"run directory: {run_dir}" in out
    elif argv[:2] == ["pm-ray", "compare"]:
        spec = yaml.safe_load((REPO / argv[2]).read_text())
        for name in spec["strategies"]:
            assert state(work / "runs" / f"compare-{name}")["completed"] == 2, name
            assert name in out, name
    elif argv[:2] == ["pm-ray", "tune"]:
        search = yaml.safe_load((work / argv[2]).read_text())["search"]
        exp = work / "runs" / search["name"]
        assert (exp / "best.yaml").is_file() and (exp / "results.md").is_file()
        import pyarrow.parquet as pq

        assert pq.read_table(exp / "results.parquet").num_rows == len(next(iter(search["space"].values()))["grid"])
    elif argv[:2] == ["pm-ray", "report"]:
        plots = [line.removeprefix("plot: ") for line in out.splitlines() if line.startswith("plot: ")]
        assert plots and all((work / p).is_file() and (work / p).stat().st_size > 0 for p in plots)
        assert "acc" in out.lower()
    elif argv[:2] == ["pm-ray", "eval"]:
        scores = json.loads(out[out.index("{") :])
        assert set(scores) == set(state(work / argv[2])["task_names"])
        assert all(0.0 <= v["score"] <= 1.0 for v in scores.values())
    elif argv[:2] == ["pm-ray", "export"] and "--adapter" in argv:
        target = work / [a for a in argv[2:] if not a.startswith("--")][1]
        report = json.loads((target / "adapter_error.json").read_text())
        assert (target / "adapter_model.safetensors").is_file() and (target / "adapter_config.json").is_file()
        assert report["modules"] and report["max_relative_error"] < 1
    elif argv[:2] == ["pm-ray", "export"]:
        target = work / argv[3]
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(target))
        assert model.config.model_type == "llama" and (target / "tokenizer.json").is_file()
    elif argv[0] == "jobs/submit.sh":  # the wrapper uploads the repository as the job's working dir
        assert f"submitted pm-ray-{Path(argv[1]).stem}-" in out and "succeeded" in out.lower()
        config = yaml.safe_load((work / argv[1]).read_text())
        run_dir = work / "runs" / config["storage"]["run_name"]
        s = state(run_dir)
        assert s["completed"] == 2 and s["metrics"]
        from mlflow.tracking import MlflowClient  # the job's MLflow run, in the run dir's store, ended

        client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
        (parent,) = [
            r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
        ]
        assert parent.info.status == "FINISHED" and parent.info.run_id == s["mlflow_run_id"]
    else:  # pragma: no cover - the KNOWN list guards this
        raise AssertionError(f"no check for {command!r}")


def test_readme_use_commands_run_on_tiny_models(tmp_path) -> None:
    commands = use_commands(REPO / "README.md")
    unknown = [c for c in commands if not c.startswith(KNOWN)]
    assert not unknown, f"README Use commands this test does not cover (add them to tests/test_readme.py): {unknown}"
    assert len(commands) >= 8
    work = make_workdir(tmp_path)
    heads = ExitStack()
    env = dict(
        os.environ,
        PYTHONPATH=str(work),
        HF_HUB_OFFLINE="1",
        RAY_AUTH_MODE="disabled",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)  # the embedded default for the pm-ray commands
    address = None
    with heads:
        for command in commands:
            if command == "cluster/local_head.sh start":
                syntax = subprocess.run(
                    ["bash", "-n", str(work / "cluster" / "local_head.sh")], capture_output=True, text=True
                )
                assert syntax.returncode == 0, syntax.stderr
                address, _ = heads.enter_context(start_local_head())  # stands in for it, on free ports
                continue
            run_command(command, work, env, address, tmp_path)


def run_command(command: str, work: Path, env: dict[str, str], address: str | None, tmp_path: Path) -> None:
    """Run one README command in the work dir and check what it produced."""
    argv = shlex.split(command)
    started = time.time()
    if argv[0] == "jobs/submit.sh":
        assert address, "jobs/submit.sh needs the local head started before it"
        # the local run of the same config moves aside, so the job computes a fresh run directory
        (work / "runs").rename(tmp_path / "runs-local")
        proc = subprocess.run(
            [str(work / argv[0]), *argv[1:]],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(env, RAY_ADDRESS=address),
        )
    else:
        proc = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], cwd=work, capture_output=True, text=True, timeout=600, env=env
        )
    print(f"{command}: {time.time() - started:.0f} s")
    assert proc.returncode == 0, f"{command!r} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    check(command, proc, work)
