"""Cost of the Fisher pass against one training pass over the same N examples.

Fisher: pm_ray.core.fisher.diagonal_fisher over N examples in batches of --batch-size, with the
LoRA parameters frozen as the worker loop does (step c of pm_ray/train/loop.py): one forward,
one backward to the adapted modules' outputs, and the per-example squared gradients of every
adapted base weight (a batched matmul per module). Training pass: the same batches, LoRA
trainable, ``model(**batch).loss.backward()`` (no optimizer step), gradients zeroed after.

Both run on one model in turn (A B A B ..., --repeats pairs, after one warm-up of each); the
ratio Fisher / training is taken pair by pair, on wall time and on this process's CPU time
(time.process_time, nearly blind to other load). Prints one JSON object.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fisher_cost.py --model bundled:smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from pm_ray.core.fisher import diagonal_fisher
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora


def summary(values: list[float], digits: int = 4) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--examples", type=int, default=32, help="N (jobs/quickstart.yaml: fisher.num_samples 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--targets", default=None, help="LoRA targets (default: k,v; 'all-linear')")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    torch.manual_seed(0)
    model, _ = load_backbone(args.model)
    model = attach_lora(model, rank=8, alpha=16, targets=args.targets, adapter_name="task1")
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # a trained-looking adapter (B = 0 at init would still give the same cost)
        for p in trainable:
            p.normal_(0, 0.01)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, args.examples, args.batch_size):
        n = min(args.batch_size, args.examples - start)
        ids = torch.randint(0, vocab, (n, args.seq_len), generator=gen)
        labels = ids.clone()
        labels[:, : args.seq_len // 2] = -100  # prompt tokens masked, as the instruction tokenizer does
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})

    def fisher_pass() -> tuple[float, float]:
        for p in trainable:
            p.requires_grad_(False)
        t0, c0 = time.perf_counter(), time.process_time()
        shard = diagonal_fisher(model, iter(batches), kind="causal_lm", adapter_name="task1")
        elapsed = (time.perf_counter() - t0, time.process_time() - c0)
        for p in trainable:
            p.requires_grad_(True)
        assert shard.count == args.examples
        return elapsed

    def train_pass() -> tuple[float, float]:
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches:
            model(**batch).loss.backward()
        for p in trainable:
            p.grad = None
        return time.perf_counter() - t0, time.process_time() - c0

    sides = {"fisher": fisher_pass, "train_fwd_bwd": train_pass}
    for fn in sides.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    ratios, cpu_ratios = [], []
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            wall, cpu_s = sides[name]()
            times[name].append(wall)
            cpu[name].append(cpu_s)
        ratios.append(times["fisher"][-1] / times["train_fwd_bwd"][-1])
        cpu_ratios.append(cpu["fisher"][-1] / cpu["train_fwd_bwd"][-1])
    print(
        json.dumps(
            {
                "benchmark": "fisher_cost",
                "machine": f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                f"torch {torch.__version__}, load average {load0:.1f} at start",
                "other_load_present": True,
                "note": "2-core machine shared with other work; the two passes alternate, ratio per pair",
                "model": args.model,
                "lora_targets": args.targets or "k_proj, v_proj (per-architecture default)",
                "examples": args.examples,
                "batch": [args.batch_size, args.seq_len],
                "pairs": args.repeats,
                "seconds": {name: summary(v) for name, v in times.items()},
                "ratio_fisher_over_train_pass": summary(ratios, 3),
                "cpu_seconds": {name: summary(v) for name, v in cpu.items()},
                "ratio_fisher_over_train_pass_cpu_time": summary(cpu_ratios, 3),
                "target": "<= 1.5",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
