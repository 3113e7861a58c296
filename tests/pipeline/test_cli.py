"""Bad config / data / model: exit code 2, a one-line reason, and no run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pm_ray.cli import main
from tinyconfig import tiny_config, write_config


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture
def storage(tmp_path) -> Path:
    return tmp_path / "runs"


def assert_nothing_written(storage: Path) -> None:
    leftovers = [p for p in storage.rglob("*") if ".cache" not in p.parts] if storage.exists() else []
    assert not leftovers, leftovers


def test_unknown_key_suggests_the_closest(tmp_path, storage, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config(storage))
    code, err = run_cli(["run", str(config), "trainer.step_per_task=3"], capsys)
    assert code == 2
    assert "unknown config key 'trainer.step_per_task'" in err and "trainer.steps_per_task" in err
    cfg = tiny_config(storage)
    cfg["merge"] = {"stratgy": "pm"}
    code, err = run_cli(["run", str(write_config(tmp_path / "d.yaml", cfg))], capsys)
    assert code == 2 and "merge.stratgy" in err and "merge.strategy" in err and str(tmp_path / "d.yaml") in err
    assert_nothing_written(storage)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("perturbation.epsilon=1.0", "epsilon=1.0 is outside [0, 1)"),
        ("perturbation.probs=[0.5,0.5,0.5]", "summing to 1"),
        ("merge.strategy=magmx", "did you mean 'magmax'"),
        ("trainer.engine=horovod", "trainer.engine"),
        ("trainer.zero_stage=4", "ZeRO stage 4 does not exist: expected 0, 1, 2 or 3"),
        ("trainer.zero_stage=3", "trainer.zero_stage=3 partitions parameters with DeepSpeed: it needs trainer.engine"),
        (
            "trainer.engine=deepspeed trainer.zero_stage=3 merge.strategy=trm",
            "trainer.zero_stage=3 does not support merge.strategy='trm'",
        ),
        ("trainer.engine=deepspeed trainer.zero_stage=3 merge.strategy=olora", "does not support O-LoRA"),
        (
            "trainer.engine=deepspeed trainer.zero_stage=3 perturbation.mode=gaussian",
            "does not support perturbation.mode=gaussian",
        ),
        ("tasks.suite=cit9", "cit9"),
        ("model.name_or_path=/nonexistent/model", "/nonexistent/model"),
        ("model.name_or_path=bundled:gpt5", "gpt5"),
        (
            "lora.targets=[q_prj]",
            "lora.targets: LoRA targets ['q_prj'] match no module of LlamaForCausalLM (llama); did you mean 'q_proj'?",
        ),
        ("lora.targets=c_attn", "lora.targets: LoRA targets ['c_attn'] match no module"),
        (
            "trainer.engine=deepspeed trainer.deepspeed_config=/nonexistent/ds.json",
            "trainer.deepspeed_config: /nonexistent/ds.json does not exist",
        ),
        ("merge.strategy=trm trainer.steps_per_task=2", "trainer.steps_per_task=2 does not fit merge strategy 'trm'"),
    ],
)
def test_bad_values_exit_2(tmp_path, storage, capsys, override, needle) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config(storage))
    code, err = run_cli(["run", str(config), *override.split(" ")], capsys)
    assert code == 2, err
    assert needle in err
    assert err.strip().startswith("pm-ray: error:")
    assert_nothing_written(storage)


def test_bad_data_exit_2(tmp_path, storage, capsys) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(
        json.dumps({"instruction": "say hi", "output": "hi"}) + "\n" + json.dumps({"instruction": "x"}) + "\n"
    )
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"instruction": "say yo", "output": "yo"}) + "\n")
    cfg = tiny_config(
        storage,
        tasks={"suite": None, "limit": None, "files": [{"name": "greet", "train": str(train), "test": str(test)}]},
    )
    code, err = run_cli(["run", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2
    assert str(train) in err and "output" in err
    assert_nothing_written(storage)


@pytest.mark.parametrize("fmt", ["bigbench", "superni"])
def test_malformed_bigbench_or_superni_exit_2(tmp_path, storage, capsys, fmt) -> None:
    if fmt == "bigbench":
        examples = [{"input": f"q{i}", "target_scores": {"yes": 1, "no": 0}} for i in range(6)]
        examples[4] = {"input": "q4", "target_scores": {"yes": 1, "no": 1}}
        data, where = {"task_prefix": "Answer.", "examples": examples}, "example 4"
    else:
        instances = [{"id": str(i), "input": f"q{i}", "output": ["a"]} for i in range(6)]
        instances[4] = {"id": "4", "input": "q4"}
        data, where = {"Definition": ["Answer."], "Instances": instances}, "instance 4"
    path = tmp_path / "task.json"
    path.write_text(json.dumps(data))
    cfg = tiny_config(
        storage,
        tasks={"suite": None, "limit": None, "files": [{"name": "t", "path": str(path), "format": fmt, "max_test": 2}]},
    )
    code, err = run_cli(["run", str(write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2, err
    assert f"{path}, {where}" in err and len(err.strip().splitlines()) == 1
    assert_nothing_written(storage)


def test_missing_config_file_and_run_dir(tmp_path, capsys) -> None:
    code, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in err and "does not exist" in err
    code, err = run_cli(["report", str(tmp_path / "norun")], capsys)
    assert code == 2 and "state.json" in err


def test_resume_with_a_different_config_is_refused(tmp_path, storage, capsys, ray_session) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config(storage, tasks={"limit": 1}, trainer={"steps_per_task": 2}))
    code, err = run_cli(["run", str(config), "--quiet"], capsys)
    assert code == 0, err
    code, err = run_cli(["run", str(config), "--quiet", "trainer.lr=0.1"], capsys)
    assert code == 2 and "trainer.lr" in err and "different config" in err


def test_misspelt_strategy_option_fails_before_anything_is_written(tmp_path) -> None:
    """The quickstart with a typo in merge.options: exit 2, one line naming the key and the fix,
    no storage directory (the old behaviour started Ray and failed inside the workers)."""
    import os
    import subprocess
    import sys

    storage = tmp_path / "runs"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pm_ray.cli",
            "run",
            "jobs/quickstart.yaml",
            "merge.strategy=magmax",
            "merge.options={lamda: 0.5}",
            f"storage.path={storage}",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "merge.options.lamda" in lines[0] and "did you mean 'lam'" in lines[0]
    assert not storage.exists()


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_storage_path_that_cannot_be_written_exit_2(tmp_path, capsys, where) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    storage = blocker / "runs" if where == "under-a-file" else Path("/proc/pm-ray-cannot-write/runs")
    config = write_config(tmp_path / "c.yaml", tiny_config(storage))
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 2, err
    assert err.strip().startswith("pm-ray: error: storage.path:") and str(storage) in err
    assert len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a directory" and not storage.exists()
