"""Render the tables of docs/performance.md from benchmarks/results/*.json (the `performance` block).

    .venv/bin/python benchmarks/render_performance.py

A result file that is not there gives a row saying so; nothing is measured here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from doc_blocks import replace_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
FILES = (
    "train_throughput_smollm2.json",
    "train_throughput_tiny.json",
    "ray_overhead_tiny.json",
    "fisher_cost_smollm2.json",
    "fisher_cost_tiny.json",
    "merge_cost_kv.json",
    "merge_cost_all_linear.json",
    "precision_smollm2.json",
    "precision_smollm2_avx2.json",
    "precision_smollm2_avx512bf16.json",
)
# CPUs with AMX + AVX512-BF16, with AVX512-BF16 only, and with neither
PRECISION_FILES = ("precision_smollm2.json", "precision_smollm2_avx512bf16.json", "precision_smollm2_avx2.json")


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def mm(d: dict[str, float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(d['min'])} / {fmt.format(d['median'])}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cpu_ratio(d: dict[str, Any], key: str) -> str:
    return mm(d[key]) if key in d else "-"


def throughput_rows() -> list[list[str]]:
    rows = []
    for name in ("train_throughput_smollm2.json", "train_throughput_tiny.json"):
        d = load(name)
        if d is None:
            rows.append([name, "not measured", "", "", "", "", ""])
            continue
        tps = d["tokens_per_s"]
        rows.append(
            [
                f"`{d['model']}`",
                "x".join(map(str, d["batch"])),
                mm(tps["pm_ray_single"], "{:.0f}"),
                mm(tps["plain_peft"], "{:.0f}"),
                mm(d["ratio_single_over_plain"]),
                cpu_ratio(d, "ratio_single_over_plain_cpu_time"),
                d["target"],
            ]
        )
    return rows


def fisher_rows() -> list[list[str]]:
    rows = []
    for name in ("fisher_cost_smollm2.json", "fisher_cost_tiny.json"):
        d = load(name)
        if d is None:
            rows.append([name, "not measured", "", "", "", "", ""])
            continue
        sec = d["seconds"]
        rows.append(
            [
                f"`{d['model']}`",
                f"{d['examples']} ({'x'.join(map(str, d['batch']))})",
                mm(sec["fisher"], "{:.2f}"),
                mm(sec["train_fwd_bwd"], "{:.2f}"),
                mm(d["ratio_fisher_over_train_pass"]),
                cpu_ratio(d, "ratio_fisher_over_train_pass_cpu_time"),
                d["target"],
            ]
        )
    return rows


def ray_rows() -> list[list[str]]:
    d = load("ray_overhead_tiny.json")
    if d is None:
        return [["not measured", "", ""]]
    ray_side, single_side = d["sides"]
    wall = d["wall_s"]
    return [
        *[
            [
                f"whole `pm-ray run` wall s, {n} steps",
                f"Ray Train {mm(wall[f'{ray_side}@{n}'], '{:.1f}')}; single {mm(wall[f'{single_side}@{n}'], '{:.1f}')}",
                "",
            ]
            for n in d["steps"]
        ],
        [
            "fixed seconds Ray Train adds",
            mm(d["fixed_s_ray_over_single"], "{:.1f}") + " s",
            d["targets"]["fixed_s"] + " s",
        ],
        [
            "per-step ratio, state.json step_s",
            mm(d["per_step_ratio_from_state_step_s"]),
            d["targets"]["per_step_ratio"],
        ],
    ]


def merge_rows() -> list[list[str]]:
    rows = []
    for name in ("merge_cost_kv.json", "merge_cost_all_linear.json"):
        d = load(name)
        if d is None:
            rows.append([name, "not measured"] + [""] * 8)
            continue
        for shards, r in d["shards"].items():
            late = [k for k in r["merge_s"] if k != "task2"][0]
            rows.append(
                [
                    f"{d['targets']} ({d['tensor_mib']} MiB/tensor)",
                    shards.split("_")[0],
                    mm(r["merge_s"]["task2"]),
                    mm(r["merge_s"][late]),
                    f"{r['merge_s'][late]['min'] / r['merge_s']['task2']['min']:.2f} / {r['time_growth_late_over_early']:.2f}",
                    " / ".join(f"{b / 2**20:.0f}" for b in r["state_bytes_kept"].values()),
                    f"{r['peak_rss_delta_mib']['task2']['median']:.0f} / {r['peak_rss_delta_mib'][late]['median']:.0f}",
                    f"{r['memory_growth_late_over_early']:.2f}",
                    mm(r["add_over_merge_throughput"]),
                    cpu_ratio(r, "throughput_vs_add_same_bytes"),
                ]
            )
    return rows


def precision_rows() -> list[list[str]]:
    rows = []
    for name in PRECISION_FILES:
        d = load(name)
        if d is None:
            rows.append([name, "not measured", "", "", "", "", ""])
            continue
        cpu = ", ".join(d.get("cpu_bf16_flags") or []) or "none (no AMX / AVX512-BF16)"
        for part, label in (("train", "training step"), ("mc_scoring", "choice scoring"), ("generation", "generation")):
            r = d[part]
            batch = "x".join(map(str, r.get("batch", [])))
            size = f"{r['steps_per_block']} steps of {batch}" if part == "train" else f"{r['rows']} rows"
            if part == "train":
                agree = f"loss {r['last_loss']['fp32']:.4f} vs {r['last_loss']['bf16-mixed']:.4f}"
            elif part == "mc_scoring":
                agree = f"predictions {r['predictions_agree']}, max score diff {r['max_abs_score_diff']}"
            else:
                agree = f"identical answers {r['answers_identical']}"
            rows.append(
                [
                    cpu,
                    label,
                    size,
                    mm(r["block_s" if part == "train" else "pass_s"]["fp32"]),
                    mm(r["block_s" if part == "train" else "pass_s"]["bf16-mixed"]),
                    f"{r['speedup_wall']:.2f} ({r['speedup_cpu_time']:.2f})",
                    agree,
                ]
            )
    return rows


def breakdown_rows() -> list[list[str]]:
    rows = []
    for name in ("task_time_breakdown_demo.json", "task_time_breakdown_tiny_run.json"):
        d = load(name)
        if d is None:
            continue
        for file, entries in d["files"].items():
            for e in entries:
                f = e["fraction"]
                rows.append(
                    [
                        f"{file} ({e['strategy']})",
                        f"{e['mean_task_s']:.1f}",
                        f"{f.get('train', 0):.2f}",
                        *(f"{f[k]:.2f}" if k in f else "-" for k in ("fisher", "merge", "evaluation", "other")),
                        f"{f['not_split']:.2f}" if "not_split" in f else "-",
                    ]
                )
    return rows


def render() -> str:
    found = [d for d in map(load, FILES) if d is not None and "machine" in d]
    torches = sorted({d["machine"].split("torch ")[-1].split(",")[0] for d in found if "torch " in d["machine"]})
    loads = [float(d["machine"].split("load average ")[1].split()[0]) for d in found if "load average" in d["machine"]]
    load_text = f"load average {min(loads):.1f}-{max(loads):.1f} when the runs started or ended" if loads else ""
    parts = [
        "Machine: a shared 2-core x86_64 CPU VM (23 GiB, no GPU), 2 torch threads, torch "
        + ", ".join(torches)
        + f". The older result files were measured while other work shared the 2 cores ({load_text}, "
        "each file's own in its machine field): absolute times are slow and noisy, ratios come from interleaved "
        "pairs. Cells are min / median.",
        "",
        "**Training throughput** (tokens/s, pm-ray's worker step on engine `single` vs a plain PEFT + AdamW loop)",
        "",
        table(
            ["model", "batch", "pm-ray single", "plain PEFT", "ratio", "ratio (CPU time)", "target"], throughput_rows()
        ),
        "",
        "**Ray's price** (1-task tiny run, `pm-ray run` on Ray Train with DeepSpeed, 1 worker, vs engine `single`)",
        "",
        table(["figure", "measured", "target"], ray_rows()),
        "",
        "**Fisher pass** vs one training pass (forward + backward, no optimizer) over the same N examples",
        "",
        table(["model", "N (batch)", "Fisher s", "train pass s", "ratio", "ratio (CPU time)", "target"], fisher_rows()),
        "",
        "**Merge** (strategy `pm`, SmolLM2-135M adapted-weight shapes, MergeShard objects called in-process) at task 2 vs 20",
        "",
        table(
            [
                "targets",
                "shards",
                "task 2 s",
                "task 20 s",
                "time growth",
                "state kept MiB (2 / 20)",
                "peak RSS rise MiB (2 / 20)",
                "memory growth",
                "add / merge",
                "vs add, same bytes",
            ],
            merge_rows(),
        ),
        "",
        "**`trainer.precision`**: fp32 vs bf16-mixed (fp32 weights, forwards under autocast(bf16)), SmolLM2-135M "
        "with rank-8 LoRA, sides alternating in one process (`benchmarks/precision.py`), on a CPU with bf16 "
        "instructions (AMX, or AVX512-BF16 alone) and on one without (`precision: auto` picks bf16-mixed only "
        "where the CPU has AMX or AVX512-BF16)",
        "",
        table(
            ["CPU bf16 flags", "work", "size", "fp32 s", "bf16-mixed s", "speed-up wall (CPU time)", "agreement"],
            precision_rows(),
        ),
        "",
        "**Where a task's wall time goes** (fractions of task_s from state.json)",
        "",
        table(["run", "mean task s", "train", "fisher", "merge", "evaluation", "other", "not split"], breakdown_rows()),
    ]
    return "\n".join(parts)


def main() -> None:
    replace_block(DOC, "performance", render())
    print(f"wrote the performance block of {DOC}")


if __name__ == "__main__":
    main()
