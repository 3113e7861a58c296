"""Multiple-choice scoring: one forward per (row, choice) against the prompt-once KV-cache scorer.

`pairwise` is `pairwise_choice_scores` (each pair right-padded as prompt + choice, the reference);
`cached` is `choice_scores` (the default in evaluation: the prompt runs once per row, the choices
continue from its cached keys/values). Both run in the same process on the same rows, alternating
(pairwise, cached, pairwise, cached, ...) so that load from other processes hits both alike. Prints
JSON: median wall seconds per pass of each, rows/s, the speed-up (pairwise / cached), the same
for process CPU time (less disturbed by other load on a shared machine), the largest score
difference and whether the predictions agree.

    .venv/bin/python benchmarks/mc_scoring.py                      # tiny:llama
    .venv/bin/python benchmarks/mc_scoring.py --model bundled:smollm2-135m-instruct --rows 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from typing import Any

import torch

from pm_ray.data.prompts import format_prompt
from pm_ray.eval.choices import choice_scores, pairwise_choice_scores
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora

WORDS = (
    "the a river stone bright quickly answer question because which after people city small "
    "carried over light morning water under never always reason found likely"
).split()
CHOICES = ["yes", "no", "maybe", "it is not possible to tell", "the second one", "red", "a small stone", "water"]


def mc_rows(n: int, n_choices: int, min_words: int, max_words: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows, `n_choices` distinct choices each, prompts of min..max words (different lengths)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        choices = rng.sample(CHOICES, n_choices)
        rows.append({"instruction": f"Question {i}: {text}?", "output": choices[0], "choices": choices})
    return rows


def best(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda k: (scores[k], -k))  # the evaluation's tie rule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:llama", help="tiny:llama, bundled:smollm2-135m-instruct, a path")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (as eval.batch_size)")
    parser.add_argument("--min-words", type=int, default=30)
    parser.add_argument("--max-words", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--machine", default="", help="free text naming the machine, copied to the JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_backbone(args.model)
    model = attach_lora(model, rank=8, alpha=16).eval()  # LoRA attached, as the evaluation sees it
    with torch.no_grad():  # non-zero B so that the adapter changes the scores
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    rows = mc_rows(args.rows, args.choices, args.min_words, args.max_words)
    prompt_tokens = [len(tok(format_prompt(tok, r), add_special_tokens=False)["input_ids"]) for r in rows]
    kw = {"batch_size": args.batch_size, "max_length": 1024}
    methods = {"pairwise": pairwise_choice_scores, "cached": choice_scores}
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    scores: dict[str, list[list[float]]] = {}
    load_before = os.getloadavg()
    for m, fn in methods.items():  # warm-up, untimed
        scores[m] = fn(model, tok, rows[: args.batch_size], **kw)
    for _ in range(args.repeats):
        for m, fn in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            scores[m] = fn(model, tok, rows, **kw)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    load_after = os.getloadavg()
    med = {m: statistics.median(t) for m, t in times.items()}
    med_cpu = {m: statistics.median(t) for m, t in cpu.items()}
    diff = max(abs(a - b) for ra, rb in zip(scores["pairwise"], scores["cached"]) for a, b in zip(ra, rb))
    agree = sum(best(a) == best(b) for a, b in zip(scores["pairwise"], scores["cached"]))
    print(
        json.dumps(
            {
                "benchmark": "mc_scoring",
                "model": args.model,
                "lora": "rank 8 on default targets (k_proj, v_proj), B ~ N(0, 0.02)",
                "dtype": str(next(model.parameters()).dtype),
                "rows": args.rows,
                "choices_per_row": args.choices,
                "batch_size": args.batch_size,
                "prompt_tokens": {
                    "min": min(prompt_tokens),
                    "max": max(prompt_tokens),
                    "mean": statistics.mean(prompt_tokens),
                },
                "repeats": args.repeats,
                "pairwise_s": med["pairwise"],
                "cached_s": med["cached"],
                "pairwise_rows_per_s": args.rows / med["pairwise"],
                "cached_rows_per_s": args.rows / med["cached"],
                "speedup": med["pairwise"] / med["cached"],
                "pairwise_cpu_s": med_cpu["pairwise"],
                "cached_cpu_s": med_cpu["cached"],
                "speedup_cpu_time": med_cpu["pairwise"] / med_cpu["cached"],
                "all_times_s": times,
                "all_cpu_s": cpu,
                "max_abs_score_diff": diff,
                "predictions_agree": f"{agree}/{len(rows)}",
                "machine": {
                    "note": args.machine,
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_1_5_15_before": load_before,
                    "loadavg_1_5_15_after": load_after,
                    "torch": torch.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
