"""`trainer.precision`: fp32 against bf16-mixed (fp32 weights, forwards under autocast(bfloat16)).

Three figures, each measured side by side in this one process (the sides alternate, A B then B A):
- the training step: pm-ray's worker step on engine `single` (benchmarks/train_throughput.py's
  PmRaySide) with `precision=fp32` against `precision=bf16-mixed`, two copies of the model with the
  same seed on the same batches (random token ids, --batch-size x --seq-len);
- multiple-choice scoring: `choice_scores` on the same LoRA model and rows, with and without
  `compute_precision("cpu")` (what the Fisher pass and the evaluation use);
- greedy generation: `generate_answers`, the same way.
It also reports what bf16 costs in agreement: the largest score difference, the predictions that
agree, identical generated answers, and the training losses of both sides after the timed steps.
Time is wall time and this process's CPU time (time.process_time), median over the repeats.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/precision.py --model bundled:smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.mc_scoring import best, mc_rows
from benchmarks.train_throughput import PmRaySide, machine, summary
from pm_ray.eval.choices import choice_scores
from pm_ray.eval.generation import generate_answers
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora
from pm_ray.train.engine import compute_precision

SIDES = ("fp32", "bf16-mixed")


def context(side: str) -> contextlib.AbstractContextManager[Any]:
    return compute_precision("cpu") if side == "bf16-mixed" else contextlib.nullcontext()


def timed_pairs(run: Callable[[str], Any], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Wall and CPU seconds of run(side) per side, alternating; the last result of each side."""
    wall: dict[str, list[float]] = {s: [] for s in SIDES}
    cpu: dict[str, list[float]] = {s: [] for s in SIDES}
    last: dict[str, Any] = {}
    for r in range(repeats):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            t0, c0 = time.perf_counter(), time.process_time()
            last[side] = run(side)
            wall[side].append(time.perf_counter() - t0)
            cpu[side].append(time.process_time() - c0)
    return wall, cpu, last


def speedup(times: dict[str, list[float]]) -> float:
    return round(statistics.median(times["fp32"]) / statistics.median(times["bf16-mixed"]), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=3, help="training steps per timed block")
    parser.add_argument("--rows", type=int, default=32, help="rows scored / generated per timed pass")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--machine", default="", help="free text naming the machine, copied to the JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # training: two identical models, one per precision
    trainers = {side: PmRaySide(args.model, 2e-3, precision=side) for side in SIDES}
    vocab = trainers["fp32"].model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(1 + args.train_steps * args.repeats):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    first_loss = {side: trainers[side].step(batches[0]) for side in SIDES}  # warm-up, untimed
    cursor = {side: 1 for side in SIDES}

    def train_block(side: str) -> float:
        loss = float("nan")
        for _ in range(args.train_steps):
            loss = trainers[side].step(batches[cursor[side]])
            cursor[side] += 1
        return loss

    train_wall, train_cpu, last_loss = timed_pairs(train_block, args.repeats)
    trainers.clear()  # free both training copies before the evaluation model loads

    # evaluation: one LoRA model, the same rows, with and without autocast
    torch.manual_seed(0)
    model, tok = load_backbone(args.model)
    model = attach_lora(model, rank=8, alpha=16).eval()
    with torch.no_grad():  # non-zero B so that the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    rows = mc_rows(args.rows, 4, 10, 40)

    def score(side: str) -> list[list[float]]:
        with torch.no_grad(), context(side):
            return choice_scores(model, tok, rows, batch_size=args.eval_batch_size, max_length=512)

    def generate(side: str) -> list[str]:
        with torch.no_grad(), context(side):
            return generate_answers(
                model,
                tok,
                rows,
                batch_size=args.eval_batch_size,
                max_new_tokens=args.max_new_tokens,
                max_prompt_length=512,
            )

    for side in SIDES:  # warm-up, untimed
        score(side)
        generate(side)
    mc_wall, mc_cpu, mc_last = timed_pairs(score, args.repeats)
    gen_wall, gen_cpu, gen_last = timed_pairs(generate, args.repeats)
    a, b = mc_last["fp32"], mc_last["bf16-mixed"]
    print(
        json.dumps(
            {
                "benchmark": "precision",
                "machine": machine() + (f"; {args.machine}" if args.machine else ""),
                "cpu_bf16_flags": sorted(
                    f for f in ("amx_bf16", "avx512_bf16") if f in open("/proc/cpuinfo").read().split()
                ),
                "model": args.model,
                "sides": "fp32 = trainer.precision fp32; bf16-mixed = fp32 weights, forwards under autocast(bf16)",
                "repeats": args.repeats,
                "train": {
                    "batch": [args.batch_size, args.seq_len],
                    "steps_per_block": args.train_steps,
                    "block_s": {s: summary(v) for s, v in train_wall.items()},
                    "speedup_wall": speedup(train_wall),
                    "speedup_cpu_time": speedup(train_cpu),
                    "first_loss": first_loss,
                    "last_loss": last_loss,
                },
                "mc_scoring": {
                    "rows": args.rows,
                    "choices_per_row": 4,
                    "pass_s": {s: summary(v) for s, v in mc_wall.items()},
                    "speedup_wall": speedup(mc_wall),
                    "speedup_cpu_time": speedup(mc_cpu),
                    "max_abs_score_diff": round(max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), 5),
                    "predictions_agree": f"{sum(best(ra) == best(rb) for ra, rb in zip(a, b))}/{len(rows)}",
                },
                "generation": {
                    "rows": args.rows,
                    "max_new_tokens": args.max_new_tokens,
                    "pass_s": {s: summary(v) for s, v in gen_wall.items()},
                    "speedup_wall": speedup(gen_wall),
                    "speedup_cpu_time": speedup(gen_cpu),
                    "answers_identical": f"{sum(x == y for x, y in zip(gen_last['fp32'], gen_last['bf16-mixed']))}/{len(rows)}",
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
