"""O-LoRA end to end on tiny:llama (engine single, 2 tasks): the A files, the orthogonality a large λ
buys over λ = 0, a resume that loads the old A's, the combination with P&M, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pm_ray.cli import main
from pm_ray.config import config_from_dict
from pm_ray.core.orthogonal import overlap
from pm_ray.core.tensors import load_tensors
from pm_ray.pipeline import run_continual
from pm_ray.train import orthogonal_state as orthogonal_state_module
from runcli import run_in_process_until_task_1_commits
from tinyconfig import tiny_config, write_config

pytestmark = pytest.mark.integration

BIG_LAM = 50.0


def olora_config(storage: Path, name: str, **sections: dict) -> dict:
    sections = {"trainer": {"steps_per_task": 6}, **sections}
    return tiny_config(
        storage,
        tasks={"suite": "cit5", "variant": "quick", "limit": 2},
        storage={"path": str(storage), "run_name": name},
        **sections,
    )


def lora_a(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The saved A matrices of each task, in task order (checking each file's metadata)."""
    state = json.loads((run_dir / "state.json").read_text())
    out = []
    for i, name in enumerate(state["task_names"], start=1):
        tensors, meta = load_tensors(run_dir / "tasks" / f"{i}-{name}" / "lora_A.safetensors")
        assert meta == {"kind": "lora_A", "task": i}
        out.append(tensors)
    return out


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory) -> dict[str, Path]:
    """olora with λ = 0 and with a large λ (identical otherwise: same A_1, same init of A_2)."""
    storage = tmp_path_factory.mktemp("olora") / "runs"
    dirs = {}
    for name, lam in (("lam0", 0.0), ("big", BIG_LAM)):
        cfg = olora_config(storage, name, merge={"strategy": "olora"}, orthogonal={"lam": lam})
        dirs[name] = run_continual(config_from_dict(cfg), quiet=True).run_dir
    return dirs


def test_large_lambda_makes_the_new_a_orthogonal_to_the_old(runs) -> None:
    zero, big = lora_a(runs["lam0"]), lora_a(runs["big"])
    assert all(len(a) == 2 and a[0] for a in (zero, big))
    for key in zero[0]:  # task 1 has no old task: no penalty, the same A_1 in both runs
        torch.testing.assert_close(zero[0][key], big[0][key])
    free, orthogonal = overlap(zero[1], [zero[0]]), overlap(big[1], [big[0]])
    assert free > 0 and orthogonal < 0.25 * free, (free, orthogonal)
    raw_free = sum(float((zero[0][k] @ zero[1][k].T).pow(2).sum()) for k in zero[0])
    raw_orth = sum(float((big[0][k] @ big[1][k].T).pow(2).sum()) for k in big[0])
    assert raw_orth < 0.5 * raw_free, (raw_free, raw_orth)
    state = json.loads((runs["big"] / "state.json").read_text())
    assert state["strategy"] == "olora" and state["alphas"] == [1.0, 1.0]  # sequential merging
    assert "orth_overlap" not in state["diagnostics"][0]
    assert state["diagnostics"][1]["orth_overlap"] == pytest.approx(orthogonal, rel=1e-5)


def test_resume_loads_the_old_a_and_matches_the_uninterrupted_run(ray_session, runs, tmp_path, monkeypatch) -> None:
    cfg = config_from_dict(
        olora_config(tmp_path / "runs", "resumed", merge={"strategy": "olora"}, orthogonal={"lam": BIG_LAM})
    )
    run_in_process_until_task_1_commits(cfg, monkeypatch)
    run_dir = tmp_path / "runs" / "resumed"
    assert json.loads((run_dir / "state.json").read_text())["completed"] == 1

    loaded: list[list[int]] = []
    for_run = orthogonal_state_module.OrthogonalState.for_run.__func__

    def spy(cls, *args, **kwargs):
        state = for_run(cls, *args, **kwargs)
        loaded.append(sorted(state.saved))
        return state

    monkeypatch.setattr(orthogonal_state_module.OrthogonalState, "for_run", classmethod(spy))
    run_continual(cfg, quiet=True)
    assert loaded == [[1]]  # the resumed worker started from task 1's A on disk
    resumed, reference = lora_a(run_dir), lora_a(runs["big"])
    for key in reference[1]:  # A_2 trained against the loaded A_1 exactly as in the uninterrupted run
        torch.testing.assert_close(resumed[1][key], reference[1][key])


def test_pm_with_orthogonal_training(ray_session, tmp_path) -> None:
    cfg = olora_config(tmp_path / "runs", "pm-olora", merge={"strategy": "pm"}, orthogonal={"enabled": True})
    run_dir = run_continual(config_from_dict(cfg), quiet=True).run_dir
    state = json.loads((run_dir / "state.json").read_text())
    assert state["strategy"] == "pm" and state["completed"] == 2
    assert len(lora_a(run_dir)) == 2 and "orth_overlap" in state["diagnostics"][1]


def test_without_orthogonal_training_no_a_files(tmp_path, ray_session) -> None:
    cfg = olora_config(tmp_path / "runs", "seq", merge={"strategy": "sequential"}, trainer={"steps_per_task": 2})
    run_dir = run_continual(config_from_dict(cfg), quiet=True).run_dir
    assert not list(run_dir.glob("tasks/*/lora_A.safetensors"))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["orthogonal.lam=-1"], "orthogonal.lam: Input should be greater than or equal to 0"),
        (["merge.strategy=olora", "orthogonal.l2=-0.1"], "orthogonal.l2: Input should be greater than or equal to 0"),
        (["merge.strategy=olora", "orthogonal.enabled=false"], "orthogonal.enabled=false contradicts"),
    ],
)
def test_bad_orthogonal_config_exits_2_naming_the_field(tmp_path, capsys, overrides, needle) -> None:
    storage = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", tiny_config(storage))
    code = main(["run", str(config), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and str(config) in err, err
    assert not storage.exists() or not any(p for p in storage.rglob("*") if ".cache" not in p.parts)
