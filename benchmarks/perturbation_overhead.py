"""Cost of the P&M perturbation per training step: none vs task_vector vs gaussian, side by side.

The task-vector perturbation only rescales the LoRA branch (no extra pass, no weight copy), so its
step time should match `none`; `gaussian` draws noise and copies LoRA factors. Prints JSON with
the median step time of each mode and the ratios to `none`, and the number of forward calls per
step (counted with a hook).

    .venv/bin/python benchmarks/perturbation_overhead.py --model tiny:llama --steps 30
    .venv/bin/python benchmarks/perturbation_overhead.py --model bundled:smollm2-135m-instruct --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pm_ray.core.perturbation import Perturbation
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_backbone(args.model)
    model = attach_lora(model, rank=8, alpha=16, adapter_name="task1")
    model.train()
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len))}
    batch["labels"] = batch["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    results = {}
    for mode in ("none", "task_vector", "gaussian", "none"):  # `none` twice: warm-up drift check
        perturbation = Perturbation(mode=mode, epsilon=0.5)
        times = []
        forwards[0] = 0
        for step in range(args.steps):
            t0 = time.perf_counter()
            with perturbation.apply(model, rank=0, step=step, adapter_name="task1"):
                loss = model(**batch).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        results[mode] = {"median_step_s": statistics.median(times[2:]), "forwards_per_step": forwards[0] / args.steps}
    base = results["none"]["median_step_s"]
    print(
        json.dumps(
            {
                "benchmark": "perturbation_overhead",
                "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
                "model": args.model,
                "batch": [args.batch_size, args.seq_len],
                "steps": args.steps,
                "modes": results,
                "ratio_to_none": {m: round(r["median_step_s"] / base, 3) for m, r in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
