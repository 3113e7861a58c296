"""Tables, plots and the run report (pm_ray.report): real files, read back."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pm_ray.core.metrics import continual_metrics
from pm_ray.report import (
    StateFileError,
    format_alpha,
    format_comparison_table,
    format_number,
    format_results_table,
    plot_accuracy_heatmap,
    plot_alphas,
    plot_comparison,
    plot_task_curves,
    write_report,
)

NAMES = ["sst2", "boolq", "mnli"]
# Upper-triangle entries are deliberately present/NaN/absent: the tables and plots must ignore them.
R = [[0.9, 0.111, math.nan], [0.85, 0.8], [0.8, 0.75, 0.7]]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert len(data) > 0 and data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0, f"{path} is a single colour"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "temp file left behind"


def markdown_cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in line[2:-2].split(" | ")]


# ---- tables -----------------------------------------------------------------------------------------


def test_results_table_shows_lower_triangle_to_three_decimals() -> None:
    lines = format_results_table(R, NAMES).splitlines()
    assert lines[0].split() == ["after", "task", "sst2", "boolq", "mnli", "mean"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["1", "sst2", "0.900", "0.900"]  # 0.111 above the diagonal is hidden
    assert lines[3].split() == ["2", "boolq", "0.850", "0.800", "0.825"]
    assert lines[4].split() == ["3", "mnli", "0.800", "0.750", "0.700", "0.750"]
    # aligned: scores are right-aligned under their header
    sst2_end = lines[0].index("sst2") + len("sst2")
    assert [line[sst2_end - 5 : sst2_end] for line in lines[2:]] == ["0.900", "0.850", "0.800"]
    assert {len(line) for line in lines[2:] + [lines[0]] if line.endswith(("mean", "0.900", "0.825", "0.750"))} == {
        len(lines[0])
    }


def test_results_table_markdown_is_a_valid_aligned_pipe_table() -> None:
    lines = format_results_table(R, NAMES, markdown=True).splitlines()
    assert len({len(line) for line in lines}) == 1, "columns are not padded to a common width"
    header, rule, *rows = (markdown_cells(line) for line in lines)
    assert header == ["after task", "sst2", "boolq", "mnli", "mean"]
    assert all(re.fullmatch(r"-+:?", cell) for cell in rule)
    assert rows[0] == ["1 sst2", "0.900", "", "", "0.900"]
    assert rows[2] == ["3 mnli", "0.800", "0.750", "0.700", "0.750"]


def test_results_table_marks_missing_lower_triangle_scores() -> None:
    table = format_results_table([[0.5], [None, 0.25]], ["a", "b"], markdown=True)
    assert markdown_cells(table.splitlines()[3]) == ["2 b", "-", "0.250", "0.250"]


def test_results_table_rejects_more_rows_than_task_names() -> None:
    with pytest.raises(ValueError, match="2 rows but only 1 task names"):
        format_results_table([[0.5], [0.4, 0.3]], ["a"])


def test_comparison_table_columns_values_and_extra_diagnostics() -> None:
    rows = [
        {
            "strategy": "pm",
            "acc": 0.75,
            "aaa": 0.825,
            "forgetting": 0.075,
            "bwt": -0.075,
            "alphas": [1.0, {"q": 0.4, "v": 0.6}, None],
            "wall_s": 12.345,
            "first_step_grad_norm": 1.234e-05,
        },
        {"strategy": "average", "acc": 0.7, "aaa": 0.8, "forgetting": 0.1, "bwt": -0.1, "alphas": None, "wall_s": 3},
    ]
    lines = format_comparison_table(rows, markdown=True).splitlines()
    header, rule, pm, average = (markdown_cells(line) for line in lines)
    assert header == ["strategy", "acc", "aaa", "forgetting", "bwt", "alphas", "wall_s", "first_step_grad_norm"]
    assert len(rule) == len(header)
    assert pm == ["pm", "0.750", "0.825", "0.075", "-0.075", "1.000, 0.500 (0.400..0.600), -", "12.3", "1.234e-05"]
    assert average == ["average", "0.700", "0.800", "0.100", "-0.100", "-", "3.0", "-"]
    plain = format_comparison_table(rows).splitlines()
    assert "|" not in "".join(plain) and plain[2].split()[:5] == ["pm", "0.750", "0.825", "0.075", "-0.075"]


def test_markdown_escapes_pipes_in_values() -> None:
    line = format_comparison_table([{"strategy": "a|b"}], markdown=True).splitlines()[2]
    assert line.startswith("| a\\|b ")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.5, "0.500"),
        (0.0, "0.000"),
        (-0.0751, "-0.075"),
        (2e-05, "2.000e-05"),
        (3, "3"),
        (None, "-"),
        (math.nan, "nan"),
    ],
)
def test_format_number(value: object, text: str) -> None:
    assert format_number(value) == text


def test_format_alpha_per_module_shows_mean_and_range() -> None:
    assert format_alpha({"a": 0.2, "b": 0.4, "c": 0.9}) == "0.500 (0.200..0.900)"
    assert format_alpha({"a": 0.3, "b": 0.3}) == "0.300"
    assert format_alpha(0.25) == "0.250"
    assert format_alpha(None) == "-"
    with pytest.raises(ValueError, match="α 'big': 'big' is not a number"):
        format_alpha("big")  # type: ignore[arg-type]


# ---- plots ------------------------------------------------------------------------------------------


PLOTS = {
    "heatmap": lambda path: plot_accuracy_heatmap(R, NAMES, path),
    "alphas": lambda path: plot_alphas([1.0, {"q": 0.4, "v": 0.6}, None], NAMES, path),
    "task_curves": lambda path: plot_task_curves(R, NAMES, path),
    "comparison": lambda path: plot_comparison(
        [{"strategy": "pm", "acc": 0.75, "forgetting": 0.07}, {"strategy": "average", "acc": 0.7, "forgetting": 0.1}],
        path,
    ),
}


@pytest.mark.parametrize("kind", sorted(PLOTS))
def test_plot_is_a_valid_png_written_where_asked(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "plots" / f"{kind}.png"  # the directory does not exist yet
    assert PLOTS[kind](target) == target
    assert_valid_png(target)


def test_plot_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "alphas.png"
    target.write_bytes(b"old")
    plot_alphas([None, None], ["a", "b"], target)  # a strategy without α still gets a readable plot
    assert_valid_png(target)


# ---- write_report -----------------------------------------------------------------------------------


def write_state(run_dir: Path, **overrides: object) -> Path:
    state = {
        "version": 1,
        "run_name": "demo",
        "strategy": "pm",
        "task_names": NAMES + ["rte"],
        "completed": 3,
        "alphas": [1.0, {"q": 0.4, "v": 0.6}, 0.3],
        "accuracy": [[0.9], [0.85, 0.8], [0.8, 0.75, 0.7]],
        "metrics": {},
        "wall_s": 12.345,
        "diagnostics": [
            {
                "task": 1,
                "start_grad_norm": 9.0,
                "first_steps_loss_drop": 2.0,
                "train_s": 3.0,
                "task_s": 4.0,
                "final_loss": 0.25,
            },
            {
                "task": 2,
                "start_grad_norm": 0.5,
                "first_steps_loss_drop": 0.1,
                "train_s": 3.5,
                "task_s": 4.5,
                "final_loss": 0.5,
            },
            {
                "task": 3,
                "start_grad_norm": 1.5,
                "first_steps_loss_drop": 0.3,
                "train_s": 2.5,
                "task_s": 3.5,
                "final_loss": 0.75,
            },
        ],
        "mlflow_run_id": None,  # the pipeline writes more fields than a report needs
    }
    state.update(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "state.json"
    path.write_text(json.dumps(state))
    return path


def test_write_report_from_state_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_state(tmp_path)
    report = write_report(tmp_path)
    assert capsys.readouterr() == ("", "")
    expected = continual_metrics([[0.9], [0.85, 0.8], [0.8, 0.75, 0.7]])  # 3 of 4 tasks: metrics so far
    assert report["metrics"] == pytest.approx(expected)
    assert report["plots"] == [str(tmp_path / "report" / n) for n in ("accuracy.png", "alphas.png", "task_curves.png")]
    for path in report["plots"]:
        assert_valid_png(Path(path))
    table = report["table"]
    assert "demo: 3/4 tasks" in table
    assert re.search(r"3 mnli\s+0\.800\s+0\.750\s+0\.700\s+0\.750", table)
    # start_grad_norm / loss drop: means over tasks 2..T (task 1 starts from the pretrained model)
    assert re.search(
        r"pm\s+0\.750\s+0\.825\s+0\.075\s+-0\.075\s+1\.000, 0\.500 \(0\.400\.\.0\.600\), 0\.300\s+12\.3\s+1\.000\s+0\.200\s*$",
        table,
        re.MULTILINE,
    )
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| 3 mnli     | 0.800 | 0.750 | 0.700 | 0.750 |" in summary
    assert "![accuracy](accuracy.png)" in summary
    per_task = [markdown_cells(line) for line in summary.splitlines() if line.startswith("| 2 boolq")]
    assert per_task[-1:] == [["2 boolq", "0.500", "0.100", "0.500", "3.5", "4.5", "0.500 (0.400..0.600)"]]


def test_write_report_uses_stored_metrics(tmp_path: Path) -> None:
    stored = {"acc": 0.123, "aaa": 0.456, "forgetting": 0.0, "bwt": 0.0}
    write_state(tmp_path, metrics=stored)
    report = write_report(tmp_path)
    assert report["metrics"] == stored
    assert "0.123" in report["table"] and "0.456" in report["table"]


def test_write_report_of_a_run_with_no_completed_task(tmp_path: Path) -> None:
    write_state(tmp_path, completed=0, alphas=[], accuracy=[], diagnostics=[])
    report = write_report(tmp_path)
    assert report["metrics"] == {} and "demo: 0/4 tasks" in report["table"]
    for path in report["plots"]:
        assert_valid_png(Path(path))


def test_missing_state_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "state.json"))):
        write_report(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"version": 2}, "state version 2; expected 1"),
        ({"task_names": "sst2"}, "field 'task_names' is 'sst2'; expected a list of task names"),
        ({"completed": "3"}, "field 'completed' is '3'; expected an integer"),
        ({"accuracy": [[0.9], [0.85, 0.8]]}, "field 'accuracy' has 2 rows; expected one per completed task \\(3\\)"),
        ({"accuracy": [[0.9], [0.85, "high"], [0.8, 0.75, 0.7]]}, "R\\[2\\]\\[2\\] is 'high'; expected a number"),
        ({"alphas": [1.0, "x"]}, "field 'alphas' is \\[1.0, 'x'\\]"),
        ({"alphas": [1.0, {"q": "x"}]}, "field 'alphas': α {'q': 'x'}: 'x' is not a number"),
        ({"wall_s": "fast"}, "field 'wall_s' is 'fast'; expected a number"),
    ],
)
def test_malformed_state_json_names_file_and_field(tmp_path: Path, overrides: dict, message: str) -> None:
    path = write_state(tmp_path, **overrides)
    with pytest.raises(StateFileError, match=f"^{re.escape(str(path))}: .*{message}"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists(), "a failed report must not leave partial output"


def test_state_json_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"version": 1,')
    with pytest.raises(StateFileError, match=re.escape(str(tmp_path / "state.json")) + ": not valid JSON"):
        write_report(tmp_path)


def test_missing_field_is_named(tmp_path: Path) -> None:
    path = write_state(tmp_path)
    state = json.loads(path.read_text())
    del state["accuracy"]
    path.write_text(json.dumps(state))
    with pytest.raises(StateFileError, match="missing field 'accuracy'"):
        write_report(tmp_path)
