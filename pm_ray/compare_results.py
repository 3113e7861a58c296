"""The comparison's JSON (``compare-<spec>.json``): every strategy under every seed, summarised.

    {"format": 2, "spec": "compare", "seeds": [0, 1, 2], "reference": "sequential",
     "confidence": 0.95, "metrics": ["acc", "aaa", "forgetting", "bwt"], "same_data": true,
     "strategies": [{
        "strategy": "pm",
        "runs": [{"seed": 0, "run_name": ..., "acc": ..., "aaa": ..., "forgetting": ..., "bwt": ...,
                  "alphas": [...], "wall_s": ..., "accuracy": R, ...}, ...],     # one per seed
        "summary": {"acc": {"n", "mean", "std", "ci_half", "ci_low", "ci_high", ...}, ...},
        "paired": {"acc": {"per_seed": {"0": ...}, "mean", "ci_low", ..., "significant"}, ...},
        "alpha_summary": [summary of task t's mean α over seeds, or None], "task_scores": {...},
        # the format-1 row, so older readers keep working: means over seeds
        "acc": ..., "aaa": ..., "forgetting": ..., "bwt": ..., "alphas": [mean α per task],
        "wall_s": (sum over seeds), "accuracy": mean R, "tasks": [...], "test_rows": {...},
        "data_hashes": {...}}, ...]}

``paired`` is the per-seed difference to the reference strategy (None for the reference itself
and when the comparison has no ``sequential`` entry). :func:`as_payload` reads both this format and
format 1 (a bare list of one row per strategy, one seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pm_ray.core.coefficient import alpha_stats
from pm_ray.stats import CONFIDENCE, binomial_se, paired_difference, summarize

FORMAT = 2
METRICS = ("acc", "aaa", "forgetting", "bwt")
REFERENCE = "sequential"
RUN_ONLY = ("seed", "run_name")  # keys of a run record that are not format-1 row keys


def mean_matrix(matrices: Sequence[Sequence[Sequence[Any]]]) -> list[list[float | None]]:
    """Entry-wise mean of accuracy matrices over seeds (entries absent/None/NaN in a seed are skipped)."""
    out: list[list[float | None]] = []
    for l in range(max((len(R) for R in matrices), default=0)):
        row: list[float | None] = []
        for i in range(max((len(R[l]) for R in matrices if l < len(R)), default=0)):
            present = [float(R[l][i]) for R in matrices if l < len(R) and i < len(R[l]) and R[l][i] is not None]
            present = [v for v in present if v == v]
            row.append(sum(present) / len(present) if present else None)
        out.append(row)
    return out


def _alpha_means(alphas: Sequence[Any]) -> list[float | None]:
    return [None if (s := alpha_stats(a)) is None else s[0] for a in alphas]


def _metric(run: Mapping[str, Any], key: str) -> float:
    value = run.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def strategy_entry(
    name: str, runs: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]] | None, confidence: float
) -> dict[str, Any]:
    """One strategy's entry from its per-seed run records (see the module docstring)."""
    first = runs[0]
    summary = {k: summarize([_metric(r, k) for r in runs], confidence=confidence, what=f"{name}.{k}") for k in METRICS}
    paired = None
    if reference is not None:
        ref = {str(r["seed"]): r for r in reference}
        paired = {
            k: paired_difference(
                {str(r["seed"]): _metric(r, k) for r in runs},
                {s: _metric(r, k) for s, r in ref.items()},
                confidence=confidence,
            )
            for k in METRICS
        }
    per_seed_alphas = [_alpha_means(r.get("alphas") or []) for r in runs]
    T = max((len(a) for a in per_seed_alphas), default=0)
    alpha_summary = []
    for t in range(T):
        values = [a[t] for a in per_seed_alphas if t < len(a) and a[t] is not None]
        alpha_summary.append(summarize(values, confidence=confidence) if values else None)
    accuracy = mean_matrix([r.get("accuracy") or [] for r in runs])
    tasks, test_rows = list(first.get("tasks") or []), dict(first.get("test_rows") or {})
    task_scores = {}
    for i, task in enumerate(tasks):
        finals = [
            r["accuracy"][-1][i]
            for r in runs
            if r.get("accuracy") and i < len(r["accuracy"][-1]) and r["accuracy"][-1][i] is not None
        ]
        final = summarize(finals, confidence=confidence)
        n = test_rows.get(task)
        se = binomial_se(final["mean"], n) if final["mean"] is not None and isinstance(n, int) else None
        task_scores[task] = {"final": final, "se": se}
    diagnostics = {}
    for key in ("start_grad_norm", "first_steps_loss_drop"):
        values = [_metric(r, key) for r in runs if key in r]
        if values:
            diagnostics[key] = summarize(values)["mean"]
    hashes = [r.get("data_hashes") for r in runs]
    return {
        "strategy": name,
        **{k: summary[k]["mean"] for k in METRICS},
        "alphas": [None if s is None else s["mean"] for s in alpha_summary],
        "wall_s": round(sum(_metric(r, "wall_s") for r in runs if "wall_s" in r), 1),
        **diagnostics,
        "test_rows": test_rows,
        "accuracy": accuracy,
        "tasks": tasks,
        "data_hashes": first.get("data_hashes"),
        "same_data_across_seeds": all(h == hashes[0] for h in hashes),
        "summary": summary,
        "paired": paired,
        "alpha_summary": alpha_summary,
        "task_scores": task_scores,
        "runs": [dict(r) for r in runs],
    }


def build_payload(
    spec: str | None,
    seeds: Sequence[Any],
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    confidence: float = CONFIDENCE,
    reference: str = REFERENCE,
) -> dict[str, Any]:
    """The comparison JSON from {strategy: [run record per seed]}; a run record is a format-1 row
    (metrics, alphas, wall_s, accuracy, tasks, test_rows, data_hashes) plus its seed and run_name."""
    ref_runs = runs.get(reference)
    entries = [
        strategy_entry(name, rs, ref_runs if name != reference else None, confidence) for name, rs in runs.items()
    ]
    hashes = [e["data_hashes"] for e in entries]
    return {
        "format": FORMAT,
        "spec": spec,
        "seeds": list(seeds),
        "reference": reference if ref_runs is not None else None,
        "confidence": confidence,
        "metrics": list(METRICS),
        "same_data": all(h == hashes[0] for h in hashes) and all(e["same_data_across_seeds"] for e in entries),
        "wall_s": round(sum(e["wall_s"] for e in entries), 1),
        "strategies": entries,
    }


def as_payload(data: Any) -> dict[str, Any]:
    """A comparison JSON in the current format: format 2 as is, format 1 (a list of rows, one seed
    of unknown value) rebuilt from its rows."""
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    if isinstance(data, list) and all(isinstance(r, dict) and "strategy" in r for r in data):
        runs = {r["strategy"]: [{**r, "seed": None, "run_name": f"compare-{r['strategy']}"}] for r in data}
        return build_payload(None, [None], runs)
    raise ValueError(
        "not a pm-ray comparison JSON: expected {'format': 2, 'strategies': [...]} or a list of rows with 'strategy'"
    )


def strategy_entries(data: Any) -> list[dict[str, Any]]:
    """The per-strategy rows of a comparison JSON of either format (each has strategy, acc, aaa,
    forgetting, bwt, alphas, wall_s, accuracy, tasks, test_rows, data_hashes)."""
    return list(data) if isinstance(data, list) else as_payload(data)["strategies"]
