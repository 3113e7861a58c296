"""The outcome of a tuning experiment: one row per trial (from Tune's results and each trial's run
directory, the durable truth), the best trial, a table (printed, Markdown, Parquet), the best config
as YAML and a plot of the objective against ε. Every file is written atomically."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path
from typing import Any

from pm_ray.config import config_from_dict, dump_config
from pm_ray.core.metrics import continual_metrics
from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.rundir import RunDir
from pm_ray.tune.spec import TuneSpec, plain, set_key, trial_config_data

METRIC_COLUMNS = ("acc", "aaa", "forgetting", "bwt")
EPSILON_KEY = "perturbation.epsilon"


def _trial_index(trial_id: str) -> int:
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _error_text(error: Any) -> str:
    text = str(error).strip().splitlines()
    # Tune wraps the trial's exception; its last line names it
    return (text[-1] if text else type(error).__name__)[:300]


def collect_rows(grid: Any, spec: TuneSpec) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        run_name = Path(result.path).name
        trial_id = run_name.removeprefix("trial-")
        run = RunDir(spec.experiment_dir / "runs" / run_name)
        params = {key: plain(result.config.get(key)) for key in spec.search.space}
        row: dict[str, Any] = {
            "trial": trial_id,
            "params": params,
            "run_dir": str(run.path),
            "status": "pending",
            "tasks": 0,
            "num_tasks": None,
            "objective": math.nan,
            "wall_s": math.nan,
            "mlflow_run_id": None,
            "error": _error_text(result.error) if result.error else None,
        }
        row.update({k: math.nan for k in METRIC_COLUMNS})
        if run.exists():
            state = run.read_state()
            row.update(
                tasks=state.completed,
                num_tasks=len(state.task_names),
                wall_s=round(state.wall_s, 1),
                mlflow_run_id=state.mlflow_run_id,
            )
            if state.completed:
                done = state.completed == len(state.task_names)
                metrics = (
                    state.metrics if done and state.metrics else continual_metrics(state.accuracy[: state.completed])
                )
                row.update({k: float(metrics[k]) for k in METRIC_COLUMNS})
                row["objective"] = float(metrics[spec.search.objective])
            if row["error"]:
                row["status"] = "error"
            elif state.completed == len(state.task_names) and state.metrics:
                row["status"] = "completed"
            elif state.completed:
                row["status"] = "stopped"  # by the scheduler, after `tasks` tasks
        elif row["error"]:
            row["status"] = "error"
        rows.append(row)
    rows.sort(key=lambda r: _trial_index(r["trial"]))
    return rows


def pick_best(rows: list[dict[str, Any]], objective: str) -> dict[str, Any] | None:
    """The highest objective among trials that finished the whole stream; ties go to the earlier
    trial. Trials stopped early are not comparable (their metrics cover fewer tasks)."""
    done = [r for r in rows if r["status"] == "completed" and not math.isnan(r["objective"])]
    if not done:
        return None
    return max(done, key=lambda r: (r["objective"], -_trial_index(r["trial"])))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def format_table(rows: list[dict[str, Any]], spec: TuneSpec, best: dict[str, Any] | None) -> str:
    keys = list(spec.search.space)
    header = ["", "trial", *keys, "status", "tasks", *METRIC_COLUMNS, "wall_s"]
    body = []
    for r in rows:
        mark = "*" if best is not None and r["trial"] == best["trial"] else ""
        tasks = f"{r['tasks']}/{r['num_tasks']}" if r["num_tasks"] else "-"
        body.append(
            [
                mark,
                r["trial"],
                *(_cell(r["params"].get(k)) for k in keys),
                r["status"],
                tasks,
                *(_cell(r[k]) for k in METRIC_COLUMNS),
                _cell(r["wall_s"]),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(b) for b in body)]
    title = f"tuning {spec.name}: objective {spec.search.objective} (max), {len(rows)} trials"
    if best is not None:
        title += f"; best * {best['trial']} {spec.search.objective}={best['objective']:.4g} " + json.dumps(
            best["params"]
        )
    errors = [f"  {r['trial']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join([title, *out, *(["errors:", *errors] if errors else [])])


def _column(values: list[Any]) -> list[Any]:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    if all(isinstance(v, (str, bool)) for v in values) and len({type(v) for v in values}) == 1:
        return values
    return [json.dumps(v) for v in values]


def results_parquet(rows: list[dict[str, Any]], spec: TuneSpec, best: dict[str, Any] | None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {"trial": [r["trial"] for r in rows]}
    for key in spec.search.space:
        columns[key] = _column([r["params"].get(key) for r in rows])
    columns["status"] = [r["status"] for r in rows]
    columns["tasks"] = [int(r["tasks"]) for r in rows]
    columns["num_tasks"] = [r["num_tasks"] for r in rows]
    for key in (*METRIC_COLUMNS, "objective", "wall_s"):
        columns[key] = [float(r[key]) for r in rows]
    columns["best"] = [best is not None and r["trial"] == best["trial"] for r in rows]
    columns["run_dir"] = [r["run_dir"] for r in rows]
    columns["mlflow_run_id"] = [r["mlflow_run_id"] for r in rows]
    columns["error"] = [r["error"] for r in rows]
    table = pa.table(columns)
    table = table.replace_schema_metadata({"objective": spec.search.objective, "experiment": spec.name})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _x_axis(rows: list[dict[str, Any]], spec: TuneSpec) -> tuple[str, list[float]] | None:
    """ε when it is searched (or fixed: then every trial shares the base value); otherwise the first
    searched key with numeric values."""
    candidates = [EPSILON_KEY] if EPSILON_KEY in spec.search.space else []
    candidates += [k for k in spec.search.space if k != EPSILON_KEY]
    for key in candidates:
        values = [r["params"].get(key) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return key, [float(v) for v in values]
    eps = float(spec.base.perturbation.epsilon)
    return EPSILON_KEY, [eps for _ in rows]


def plot_objective(rows: list[dict[str, Any]], spec: TuneSpec, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, xs = _x_axis(rows, spec) or (EPSILON_KEY, [0.0] * len(rows))
    figure = Figure(figsize=(5.5, 3.8), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    styles = {"completed": ("o", "C0", "finished the stream"), "stopped": ("x", "C3", "stopped early (running value)")}
    for status, (marker, color, label) in styles.items():
        pts = [
            (x, r["objective"]) for x, r in zip(xs, rows) if r["status"] == status and not math.isnan(r["objective"])
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label, zorder=3)
    done = {}
    for x, r in zip(xs, rows):
        if r["status"] == "completed" and not math.isnan(r["objective"]):
            done.setdefault(x, []).append(r["objective"])
    if done:
        xs_sorted = sorted(done)
        ax.plot(xs_sorted, [sum(done[x]) / len(done[x]) for x in xs_sorted], color="C0", alpha=0.5, zorder=2)
    ax.set_xlabel("ε (perturbation.epsilon)" if key == EPSILON_KEY else key)
    ax.set_ylabel(f"{spec.search.objective} at the end of the stream")
    ax.set_title(f"{spec.name}: {spec.search.objective} vs {'ε' if key == EPSILON_KEY else key}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def best_config_yaml(spec: TuneSpec, best: dict[str, Any]) -> str:
    """The best trial's config as a runnable `pm-ray run` YAML (a fresh run name under the original
    storage path and tracking settings)."""
    data = trial_config_data(spec.base_data(), best["params"])
    set_key(data, "storage.run_name", f"{spec.name}-best")
    cfg = config_from_dict(copy.deepcopy(data), "best config")
    header = [
        f"# Best trial of tuning experiment {spec.name} ({spec.experiment_dir})",
        f"# {spec.search.objective} = {best['objective']:.6g}  trial {best['trial']}  run directory {best['run_dir']}",
        "# searched: " + json.dumps(plain(best["params"]), sort_keys=True),
        f"# pm-ray run {spec.experiment_dir / 'best.yaml'}",
    ]
    return "\n".join(header) + "\n" + dump_config(cfg)


def write_outputs(
    spec: TuneSpec, rows: list[dict[str, Any]], best: dict[str, Any] | None, table: str
) -> dict[str, Path]:
    exp = spec.experiment_dir
    files = {"table": exp / "results.md", "parquet": exp / "results.parquet"}
    atomic_write_bytes(files["table"], (table + "\n").encode())
    atomic_write_bytes(files["parquet"], results_parquet(rows, spec, best))
    if best is not None:
        files["best"] = exp / "best.yaml"
        atomic_write_bytes(files["best"], best_config_yaml(spec, best).encode())
    key = _x_axis(rows, spec)
    name = (
        "objective_vs_epsilon.png"
        if key is None or key[0] == EPSILON_KEY
        else f"objective_vs_{key[0].replace('.', '_')}.png"
    )
    files["plot"] = plot_objective(rows, spec, exp / name)
    return files


def finish_tracking(tracking: dict[str, str], rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """Tag each trial's MLflow run with its tuning outcome; a run stopped by the scheduler (its
    process was ended mid-run) is marked KILLED instead of staying RUNNING."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking["uri"])
    for r in rows:
        run_id = r["mlflow_run_id"]
        if not run_id:
            continue
        tags = {
            "pm_ray.tune.experiment": tracking["experiment"],
            "pm_ray.tune.trial": r["trial"],
            "pm_ray.tune.status": r["status"],
            "pm_ray.tune.best": str(best is not None and r["trial"] == best["trial"]).lower(),
        }
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if r["status"] == "stopped" and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
