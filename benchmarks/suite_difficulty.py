"""Suite difficulty: zero-shot score, score after each task's own training, score after the
whole stream trained sequentially (plain sequential LoRA: train LoRA_t, fold it in, next task).

Single process, its own minimal LoRA loop (AdamW), SmolLM2-135M-Instruct from the bundled GGUF.
Prints one JSON object. `--probe` instead trains every task separately from the base model
(difficulty check of each task on its own). `--suite bbni --tasks a,b,...` measures any of the bbni
candidates (pm_ray/data/bbni.py).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/suite_difficulty.py --suite cit5 --threads 2 > cit5.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/suite_difficulty.py --suite bbni --variant quick --probe
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from pm_ray.data.bbni import bbni_specs
from pm_ray.data.sources import load_sources
from pm_ray.data.suites import build_suite
from pm_ray.data.tokenize import TruncationStats, batch_iterator
from pm_ray.eval import evaluate_task
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--suite", default="cit5", choices=["cit5", "bbni"])
    p.add_argument("--tasks", default=None, help="bbni: comma-separated candidate names (default: the suite)")
    p.add_argument("--variant", default="full", choices=["full", "quick"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=None, help="test rows per task (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--full-matrix",
        action="store_true",
        help="after each task evaluate every seen task (default: the new task only, all at the end)",
    )
    p.add_argument("--probe", action="store_true", help="train each task separately from the base model")
    return p.parse_args()


def train_lora(
    model: torch.nn.Module, tokenizer: Any, task: Any, args: argparse.Namespace, stats: TruncationStats
) -> tuple[torch.nn.Module, list[float]]:
    """Attach a fresh rank-r LoRA (k,v), train `args.steps` steps, fold it into the weights."""
    peft_model = attach_lora(model, rank=args.rank, alpha=args.alpha, targets=None)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    peft_model.train()
    losses = []
    batches = batch_iterator(
        task, tokenizer, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, stats=stats
    )
    for _ in range(args.steps):
        batch = next(batches)
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    peft_model.eval()
    return peft_model.merge_and_unload(), losses


def evaluate(model: torch.nn.Module, tokenizer: Any, task: Any, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    r = evaluate_task(
        model,
        tokenizer,
        task,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens,
        max_rows=args.eval_rows,
        max_length=args.max_length,
    )
    r["seconds"] = round(time.time() - t0, 1)
    return r


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    if args.suite == "bbni" and args.tasks:
        tasks = load_sources(bbni_specs(args.variant, args.seed, tuple(args.tasks.split(","))))
    else:
        tasks = build_suite(args.suite, variant=args.variant, seed=args.seed, cache_dir=args.cache_dir)
    stats = TruncationStats()
    model, tokenizer = load_backbone(args.model)
    names = [t.name for t in tasks]
    out: dict[str, Any] = {
        "config": vars(args),
        "tasks": names,
        "rows": {t.name: {"train": t.train.num_rows, "test": t.test.num_rows} for t in tasks},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    zero_shot = {t.name: evaluate(model, tokenizer, t, args) for t in tasks}
    out["zero_shot"] = zero_shot
    print(json.dumps({"zero_shot": {k: v["score"] for k, v in zero_shot.items()}}), flush=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()} if args.probe else None
    matrix: list[dict[str, float]] = []
    own: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for i, task in enumerate(tasks):
        if base_state is not None:
            model.load_state_dict(base_state)
        t0 = time.time()
        model, task_losses = train_lora(model, tokenizer, task, args, stats)
        losses[task.name] = [round(x, 4) for x in task_losses]
        train_s = time.time() - t0
        last = i == len(tasks) - 1
        seen = tasks[: i + 1] if (args.full_matrix or last) and not args.probe else [task]
        row = {t.name: evaluate(model, tokenizer, t, args) for t in seen}
        own[task.name] = row[task.name]["score"]
        matrix.append({k: v["score"] for k, v in row.items()})
        print(
            json.dumps(
                {
                    "after": task.name,
                    "train_s": round(train_s, 1),
                    "loss_first_last": [losses[task.name][0], losses[task.name][-1]],
                    "scores": matrix[-1],
                }
            ),
            flush=True,
        )
    out["after_own_training"] = own
    out["loss_curves"] = losses
    if not args.probe:
        out["score_rows_after_each_task"] = matrix
        out["after_stream"] = matrix[-1]
        out["summary"] = {
            "mean_zero_shot": sum(v["score"] for v in zero_shot.values()) / len(tasks),
            "mean_after_own_training": sum(own.values()) / len(tasks),
            "mean_after_stream": sum(matrix[-1].values()) / len(tasks),
        }
    out["truncation"] = {"examples": stats.examples, "truncated": stats.truncated}
    out["wall_s"] = round(time.time() - t_start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
