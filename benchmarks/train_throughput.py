"""Training throughput: pm-ray's worker step (engine `single`) against a plain PEFT + AdamW loop.

Both sides train the same model (two copies, same seed), the same LoRA (rank 8, alpha 16, the
per-architecture k,v targets), on the same batches. pm-ray's side is what the worker loop in
pm_ray/train/loop.py does per step: build_engine(engine=single), the task-vector perturbation
context, engine.forward_loss / backward(loss + penalty) / step (which also takes the global
gradient norm), the loss all-reduce/finite check and interrupt.check(). The plain side is
``loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()``.

The sides alternate in blocks of --block steps (A B A B ..., --repeats pairs) after --warmup steps
each, so machine drift hits both; the ratio is taken pair by pair, on wall time and on this
process's CPU time (time.process_time: what the step costs, nearly blind to other load when the
machine is oversubscribed). Prints one JSON object.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/train_throughput.py --model bundled:smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from pm_ray import interrupt
from pm_ray.config import TrainerSection
from pm_ray.core.perturbation import Perturbation
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora, default_lora_targets
from pm_ray.train.engine import all_reduce_sum, build_engine


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, load average {load:.1f} at start"
    )


def summary(values: list[float], digits: int = 4) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


class PmRaySide:
    """The worker loop's per-step work (loop.py, step b) on engine `single`."""

    def __init__(self, model_ref: str, lr: float, precision: str = "fp32") -> None:
        torch.manual_seed(0)
        model, _ = load_backbone(model_ref)
        self.model = attach_lora(model, rank=8, alpha=16, adapter_name="task1")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        trainer = TrainerSection(engine="single", num_workers=1, lr=lr, precision=precision)
        self.engine = build_engine(trainer, self.model, trainable)
        self.perturbation = Perturbation("task_vector", 0.5, (1 / 3, 1 / 3, 1 / 3), 0)
        self.model.train()
        self.step_i = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        interrupt.check()
        with self.perturbation.apply(self.model, rank=0, step=self.step_i, adapter_name="task1"):
            loss = self.engine.forward_loss(batch)
            self.engine.backward(loss + 0.0)  # OrthogonalState.penalty() is 0.0 when O-LoRA is off
        self.engine.step()
        mean_loss = float(all_reduce_sum(loss.detach().float().reshape(1).cpu()).item())
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"non-finite loss {mean_loss}")
        self.step_i += 1
        return mean_loss


class PlainSide:
    """A plain PEFT + torch.optim.AdamW loop."""

    def __init__(self, model_ref: str, lr: float) -> None:
        torch.manual_seed(0)
        model, _ = load_backbone(model_ref)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=default_lora_targets(model), lora_dropout=0.0, bias="none"
        )
        self.model = get_peft_model(model, config, adapter_name="task1")
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        self.model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="A/B block pairs")
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    sides = {"pm_ray_single": PmRaySide(args.model, args.lr), "plain_peft": PlainSide(args.model, args.lr)}
    vocab = sides["plain_peft"].model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    n_batches = args.warmup + args.block * args.repeats
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    tokens_per_step = args.batch_size * args.seq_len
    first_losses = {}
    for name, side in sides.items():  # warm-up: allocator, autograd graph caches, AdamW state
        first_losses[name] = [round(side.step(b), 5) for b in batches[: args.warmup]]
    tps: dict[str, list[float]] = {name: [] for name in sides}
    cpu_tps: dict[str, list[float]] = {name: [] for name in sides}
    ratios, cpu_ratios = [], []
    for r in range(args.repeats):
        chunk = batches[args.warmup + r * args.block : args.warmup + (r + 1) * args.block]
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # A B, then B A: no fixed position
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for b in chunk:
                sides[name].step(b)
            tps[name].append(tokens_per_step * len(chunk) / (time.perf_counter() - t0))
            cpu_tps[name].append(tokens_per_step * len(chunk) / (time.process_time() - c0))
        ratios.append(tps["pm_ray_single"][-1] / tps["plain_peft"][-1])
        cpu_ratios.append(cpu_tps["pm_ray_single"][-1] / cpu_tps["plain_peft"][-1])
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "machine": machine(),
                "other_load_present": True,
                "note": "2-core machine shared with other work; sides interleaved in blocks, ratio per pair",
                "model": args.model,
                "lora": {"rank": 8, "alpha": 16, "targets": "k_proj, v_proj (per-architecture default)"},
                "batch": [args.batch_size, args.seq_len],
                "warmup_steps": args.warmup,
                "steps_per_block": args.block,
                "pairs": args.repeats,
                "warmup_losses_equal": first_losses["pm_ray_single"][0] == first_losses["plain_peft"][0],
                "tokens_per_s": {name: summary(v, 1) for name, v in tps.items()},
                "ratio_single_over_plain": summary(ratios),
                "tokens_per_cpu_s": {name: summary(v, 1) for name, v in cpu_tps.items()},
                "ratio_single_over_plain_cpu_time": summary(cpu_ratios),
                "target": ">= 0.95",
                "not_measured": "ddp / deepspeed with 2 workers (one Ray worker per core would leave no core "
                "for the plain side on this 2-core machine)",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
