"""Evaluation with the shared prompt prefix run once (eval/prefix.py) against every prompt run whole.

On the real bbni stream (the quickstart's suite, quick variant, seed 0): each task's first --rows
test rows (one rank's share in the demo: 50 of 100 on 2 workers) are scored (multiple choice) or
answered (generation) by SmolLM2-135M with a rank-8 LoRA (B ~ N(0, 0.02)), under the precision
given, with and without the shared prefix, alternating (A B, then B A) --repeats times in this one
process. Prints JSON: per task the shared prefix length, the mean prompt length, median seconds of
each side, the speed-up, and the agreement (largest score difference and predictions for choice
tasks, identical answers for generation).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/eval_prefix.py --threads 1 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from pm_ray.data.prompts import format_prompt
from pm_ray.data.suites import build_suite
from pm_ray.eval.choices import choice_scores
from pm_ray.eval.generation import generate_answers
from pm_ray.eval.prefix import shared_prefix_length
from pm_ray.eval.rows import eval_rows
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora
from pm_ray.train.engine import compute_precision


def best(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="bf16-mixed")
    parser.add_argument("--machine", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = build_suite("bbni", variant="quick", seed=0)
    torch.manual_seed(0)
    model, tok = load_backbone("bundled:smollm2-135m-instruct")
    model = attach_lora(model, rank=8, alpha=16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)

    def context() -> contextlib.AbstractContextManager[Any]:
        return compute_precision("cpu") if args.precision == "bf16-mixed" else contextlib.nullcontext()

    results = []
    totals = {False: 0.0, True: 0.0}
    for task in tasks:
        rows = eval_rows(task, max_rows=args.rows, rank=0, world_size=1)
        prompts = [tok(format_prompt(tok, r), add_special_tokens=False)["input_ids"] for r in rows]

        def run(share: bool, task: Any = task, rows: list = rows) -> Any:
            with torch.no_grad(), context():
                if task.has_choices:
                    return choice_scores(
                        model, tok, rows, batch_size=args.batch_size, max_length=args.max_length, share_prefix=share
                    )
                return generate_answers(
                    model,
                    tok,
                    rows,
                    batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens,
                    max_prompt_length=args.max_length,
                    share_prefix=share,
                )

        times: dict[bool, list[float]] = {False: [], True: []}
        last: dict[bool, Any] = {}
        for share in (False, True):  # warm-up
            run(share)
        for r in range(args.repeats):
            for share in (False, True) if r % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                last[share] = run(share)
                times[share].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in totals:
            totals[k] += med[k]
        entry: dict[str, Any] = {
            "task": task.name,
            "kind": "choices" if task.has_choices else "generation",
            "rows": len(rows),
            "mean_prompt_tokens": round(statistics.mean(map(len, prompts)), 1),
            "shared_prefix_tokens": shared_prefix_length(prompts),
            "whole_s": round(med[False], 3),
            "shared_s": round(med[True], 3),
            "speedup": round(med[False] / med[True], 3),
        }
        a, b = last[False], last[True]
        if task.has_choices:
            entry["max_abs_score_diff"] = round(max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), 6)
            entry["predictions_agree"] = f"{sum(best(x) == best(y) for x, y in zip(a, b))}/{len(rows)}"
        else:
            entry["answers_identical"] = f"{sum(x == y for x, y in zip(a, b))}/{len(rows)}"
        results.append(entry)
        print(json.dumps(entry), flush=True, file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "eval_prefix",
                "model": "bundled:smollm2-135m-instruct",
                "suite": "bbni quick seed 0",
                "precision": args.precision,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "tasks": results,
                "all_tasks_s": {"whole": round(totals[False], 3), "shared": round(totals[True], 3)},
                "speedup_all_tasks": round(totals[False] / totals[True], 3),
                "machine": {
                    "note": args.machine,
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_1_5_15": os.getloadavg(),
                    "torch": torch.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
