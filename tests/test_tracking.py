"""MLflow tracking (pm_ray.tracking) against a real sqlite store, read back with MlflowClient."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pm_ray.tracking import (
    MAX_PARAM_VALUE_CHARS,
    PARENT_RUN_TAG,
    TRUNCATION_MARKER,
    RunTracker,
    TrackingError,
    flatten,
    read_run_summary,
    tracking_uri_for,
)

# ---- no MLflow needed -------------------------------------------------------------------------------


def test_default_tracking_uri_is_sqlite_in_the_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking_uri_for("runs/a", None) == f"sqlite:///{tmp_path}/runs/a/mlflow.db"
    assert tracking_uri_for("runs/a", "http://mlflow:5000") == "http://mlflow:5000"


def test_flatten_dotted_keys_and_truncation() -> None:
    flat = flatten({"model": {"lora": {"rank": 8}, "name": None}, "tasks": ["a", "b"], "empty": {}, "long": "x" * 600})
    assert flat["model.lora.rank"] == "8"
    assert flat["model.name"] == "None"
    assert flat["tasks"] == "['a', 'b']"
    assert flat["empty"] == "{}"
    assert len(flat["long"]) == MAX_PARAM_VALUE_CHARS and flat["long"].endswith(TRUNCATION_MARKER)
    assert flatten({"exact": "y" * MAX_PARAM_VALUE_CHARS})["exact"] == "y" * MAX_PARAM_VALUE_CHARS


# ---- a real sqlite store ----------------------------------------------------------------------------
# Creating an MLflow sqlite DB runs its migrations (~2 s); every test gets its own copy of one
# migrated DB, so the tests stay independent without paying that each time.


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, migrated_db: Path) -> tuple[str, Path]:
    """(tracking URI, artifact dir) of a fresh store inside this test's tmp_path."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(migrated_db, run_dir / "mlflow.db")
    return tracking_uri_for(run_dir, None), run_dir / "artifacts"


def client_for(uri: str):  # noqa: ANN201 - mlflow is imported lazily
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.integration
@pytest.mark.slow
def test_params_are_flattened_truncated_and_batched(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    params = {"trainer": {f"p{i:03d}": i for i in range(250)}, "merge": {"strategy": "pm", "note": "z" * 700}}
    tracker = RunTracker.start(uri, "exp", "run-a", artifacts, params=params, tags={"team": "cl"})
    logged = client_for(uri).get_run(tracker.run_id).data
    assert len(logged.params) == 252  # more than one batch of 100
    assert logged.params["trainer.p249"] == "249"
    assert logged.params["merge.strategy"] == "pm"
    assert len(logged.params["merge.note"]) == MAX_PARAM_VALUE_CHARS and logged.params["merge.note"].endswith(
        TRUNCATION_MARKER
    )
    assert logged.tags["team"] == "cl"
    assert client_for(uri).get_run(tracker.run_id).info.run_name == "run-a"


@pytest.mark.integration
@pytest.mark.slow
def test_nested_runs_are_linked_to_the_parent(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    parent = RunTracker.start(uri, "exp", "parent", artifacts, params={"merge": {"strategy": "pm"}})
    for task in (1, 2):
        child = parent.nested(f"task{task}", params={"task": task})
        child.log_metrics({"acc_task1": 0.5 + task / 10, "alpha": 0.3}, step=task)
        child.end()
        parent.log_metrics({"mean_seen_accuracy": 0.9 - task / 10}, step=task)
    parent.log_metrics({"acc": 0.7, "forgetting": 0.05}, step=2)
    parent.end()

    client = client_for(uri)
    children = client.search_runs([parent.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["task1", "task2"]

    summary = read_run_summary(uri, "exp")
    assert [p["run_name"] for p in summary] == ["parent"]
    (run,) = summary
    assert run["status"] == "FINISHED" and run["params"] == {"merge.strategy": "pm"}
    assert run["metrics"] == pytest.approx({"mean_seen_accuracy": 0.7, "acc": 0.7, "forgetting": 0.05})
    assert [c["run_name"] for c in run["children"]] == ["task1", "task2"]
    assert run["children"][1]["params"] == {"task": "2"}
    assert run["children"][1]["metrics"] == pytest.approx({"acc_task1": 0.7, "alpha": 0.3})
    assert all(c["status"] == "FINISHED" for c in run["children"])


@pytest.mark.integration
@pytest.mark.slow
def test_step_losses_come_back_in_order(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    tracker = RunTracker.start(uri, "exp", "losses", artifacts, params={})
    first = [1.0 / (1 + n) for n in range(2500)]  # more than one batch of 1000 metrics
    tracker.log_step_losses(first)
    tracker.log_step_losses([0.01, 0.02], start_step=2500)
    history = client_for(uri).get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in history] == list(range(2502))
    assert [m.value for m in history] == pytest.approx(first + [0.01, 0.02])


@pytest.mark.integration
@pytest.mark.slow
def test_artifacts_land_in_artifact_dir_not_cwd(
    store: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, artifacts = store
    elsewhere = tmp_path / "elsewhere"  # stands in for Ray's temporary working directory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "accuracy.png").write_bytes(b"png")
    (plots / "summary.md").write_text("# run\n")
    state = tmp_path / "state.json"
    state.write_text("{}")

    tracker = RunTracker.start(uri, "exp", "arts", artifacts, params={})
    tracker.log_artifact(state)
    tracker.log_artifacts(plots, "plots")

    run_artifacts = artifacts / tracker.run_id / "artifacts"
    assert (run_artifacts / "state.json").read_text() == "{}"
    assert (run_artifacts / "plots" / "accuracy.png").read_bytes() == b"png"
    assert list(elsewhere.iterdir()) == [], "MLflow wrote into the working directory"
    client = client_for(uri)
    assert client.get_experiment(tracker.experiment_id).artifact_location == artifacts.resolve().as_uri()
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "plots")) == [
        "plots/accuracy.png",
        "plots/summary.md",
    ]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tracker.log_artifact(tmp_path / "missing.png")


@pytest.mark.integration
@pytest.mark.slow
def test_resume_by_run_id_appends_to_the_same_run(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    first = RunTracker.start(
        uri, "exp", "stream", artifacts, params={"merge": {"strategy": "pm"}, "tracking": {"uri": None}}
    )
    first.log_metrics({"mean_seen_accuracy": 0.9}, step=1)
    first.log_step_losses([3.0, 2.0])
    first.end(status="FAILED")

    # A new process would build a new client: so does start(); the resumed config changed a
    # resume-free field, which MLflow cannot overwrite as a param.
    resumed = RunTracker.start(
        uri,
        "exp",
        "stream",
        artifacts,
        params={"merge": {"strategy": "pm"}, "tracking": {"uri": "x"}},
        resume_run_id=first.run_id,
    )
    assert resumed.run_id == first.run_id
    client = client_for(uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    # the rank-0 worker joins the running run the same way, without counting as a resume
    worker = RunTracker.start(uri, "exp", "stream", artifacts, params={}, resume_run_id=first.run_id)
    worker.log_metrics({"mean_seen_accuracy": 0.8}, step=2)
    resumed.log_step_losses([1.0], start_step=2)
    resumed.end()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"merge.strategy": "pm", "tracking.uri": "None"}
    assert run.data.tags["param_on_resume.tracking.uri"] == "x"
    assert run.data.tags["pm_ray.resumes"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "mean_seen_accuracy")] == [
        (1, 0.9),
        (2, 0.8),
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [
        (0, 3.0),
        (1, 2.0),
        (2, 1.0),
    ]
    assert len(read_run_summary(uri, "exp")) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_resume_of_an_unknown_run_id_starts_a_new_run(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    tracker = RunTracker.start(uri, "exp", "fresh", artifacts, params={"a": 1}, resume_run_id="0" * 32)
    assert tracker.run_id != "0" * 32
    assert client_for(uri).get_run(tracker.run_id).data.params == {"a": "1"}


@pytest.mark.integration
@pytest.mark.slow
def test_bad_values_are_named(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    tracker = RunTracker.start(uri, "exp", "bad", artifacts, params={})
    with pytest.raises(TypeError, match="metric 'acc' is 'high'; expected a number"):
        tracker.log_metrics({"acc": "high"}, step=1)
    with pytest.raises(TypeError, match=r"metric 'loss\[7\]' is None"):
        tracker.log_step_losses([1.0, None], start_step=6)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="run status 'DONE'; expected one of"):
        tracker.end(status="DONE")
    with pytest.raises(TrackingError, match="experiment 'nope' not found in sqlite:///"):
        read_run_summary(uri, "nope")
