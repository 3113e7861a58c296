"""Large-backbone paths on CPU: DeepSpeed ZeRO-3 on 2 workers (gloo) against ZeRO-2, and
model.dtype=bfloat16 against float32 (docs/scale.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pm_ray.config import config_from_dict, load_config
from pm_ray.pipeline import run_continual
from runcli import kill_after_first_commit, read_state
from tinyconfig import tiny_config, two_worker_config, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def state_of(summary) -> dict:
    return json.loads((summary.run_dir / "state.json").read_text())


def zero_config(runs: Path, stage: int) -> dict:
    return two_worker_config(runs, "deepspeed", stage, tracking=False)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, zero2_run):
    """The same stream under ZeRO-2 (the session's run, tests/pipeline/conftest.py) and ZeRO-3."""
    cfg = zero_config(tmp_path_factory.mktemp("zero3"), 3)
    z3 = run_continual(config_from_dict(cfg), config_stem="zero3", quiet=True)
    return {2: state_of(zero2_run), 3: state_of(z3)}


def test_zero3_matches_zero2(zero_runs) -> None:
    z2, z3 = zero_runs[2], zero_runs[3]
    assert z3["completed"] == z2["completed"] == 3
    assert z3["alphas"] == pytest.approx(z2["alphas"], abs=1e-5)
    assert z3["accuracy"] == z2["accuracy"]
    assert [d["final_loss"] for d in z3["diagnostics"]] == pytest.approx(
        [d["final_loss"] for d in z2["diagnostics"]], rel=1e-5
    )


def test_zero3_partitions_the_base_weights(zero_runs) -> None:
    """Rank 0's resident base-weight bytes (its partitions plus any whole copy it holds, measured
    inside the run after training) are half of the model's on 2 ranks (up to partition padding)."""
    for diag in zero_runs[3]["diagnostics"]:
        full, resident = diag["base_full_bytes"], diag["base_resident_bytes"]
        assert full > 0
        assert resident == pytest.approx(full / 2, rel=0.01)
    assert "base_resident_bytes" not in zero_runs[2]["diagnostics"][0]


def test_zero3_resumes_after_a_driver_kill(tmp_path, zero_runs) -> None:
    """`pm-ray run` under stage 3 killed (SIGKILL to its whole session) after task 1 commits; the
    run resumes: W0 is gathered again and W0 + the merged delta folded module by module
    into the partitions, and the run ends with the uninterrupted stage-3 run's α's and matrix."""
    config = write_config(tmp_path / "zero3.yaml", zero_config(tmp_path / "runs", 3))
    run_dir = tmp_path / "runs" / "killed"
    killed = kill_after_first_commit(config, run_dir)
    assert 1 <= killed["completed"] < 3, "the kill must land between tasks, not after the run"
    # the resume: run_continual, what the command calls, on the test session's Ray (a CLI would
    # start its own Ray and worker group for the same code path)
    run_continual(load_config(config, ["storage.run_name=killed"]), config_stem="zero3", quiet=True)
    resumed, reference = read_state(run_dir), zero_runs[3]
    assert resumed["completed"] == 3
    assert resumed["alphas"] == pytest.approx(reference["alphas"], abs=1e-9)
    assert resumed["accuracy"] == reference["accuracy"]


@pytest.fixture(scope="module")
def fp32_state(tmp_path_factory) -> dict:
    cfg = tiny_config(tmp_path_factory.mktemp("fp32"))
    return state_of(run_continual(config_from_dict(cfg), config_stem="fp32", quiet=True))


@pytest.mark.parametrize(
    "bf16_setting",
    [{"model": {"dtype": "bfloat16"}}, {"trainer": {"precision": "bf16-mixed"}}],
    ids=["bf16-weights", "bf16-mixed"],
)
def test_bf16_matches_fp32(tmp_path, fp32_state, bf16_setting) -> None:
    """engine=single on CPU. bf16 weights: the training forward under autocast(cpu, bfloat16), Fisher,
    task vector and merge in fp32. bf16-mixed: fp32 weights, the training, Fisher and evaluation
    forwards under that autocast. Stated tolerance: α's within 0.02, final losses within 1%."""
    bf16 = state_of(
        run_continual(config_from_dict(tiny_config(tmp_path, **bf16_setting)), config_stem="bf16", quiet=True)
    )
    fp32 = fp32_state
    assert bf16["completed"] == 3
    assert bf16["alphas"] == pytest.approx(fp32["alphas"], abs=0.02)
    assert bf16["alphas"] != fp32["alphas"]  # the bf16 forwards did run: rounding moves α a little
    losses = [[d["final_loss"] for d in s["diagnostics"]] for s in (fp32, bf16)]
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
    for row32, row16 in zip(fp32["accuracy"], bf16["accuracy"]):
        assert row16 == pytest.approx(row32, abs=0.26)  # 8 eval rows: at most 2 answers differ
