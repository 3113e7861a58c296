"""Constant-memory α (CurvatureAccumulator) against the full-history reference (optimal_alpha).

Prints JSON: for T tasks over adapted modules shaped like SmolLM2-135M's k/v projections
(30 layers x 2 x 192x576), the bytes each form must keep between tasks, the time to solve α_T,
and the largest |α difference| over the stream (they must agree: same formula, other algebra).

    .venv/bin/python benchmarks/coefficient_memory.py --tasks 8 --layers 30
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from pm_ray.core.accumulator import CurvatureAccumulator
from pm_ray.core.coefficient import optimal_alpha


def nbytes(dicts) -> int:
    return sum(t.numel() * t.element_size() for d in dicts for t in d.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-out", type=int, default=192)
    parser.add_argument("--d-in", type=int, default=576)
    args = parser.parse_args()
    torch.manual_seed(0)
    keys = [f"model.layers.{i}.self_attn.{p}" for i in range(args.layers) for p in ("k_proj", "v_proj")]
    shape = (args.d_out, args.d_in)
    acc = CurvatureAccumulator()
    merged = {k: torch.zeros(shape) for k in keys}
    experts, fishers = [], []
    ref_s = acc_s = 0.0
    max_diff = 0.0
    for _ in range(1, args.tasks + 1):
        delta = {k: 0.01 * torch.randn(shape) for k in keys}
        fisher = {k: torch.rand(shape) ** 2 for k in keys}
        expert = {k: merged[k] + delta[k] for k in keys}
        t0 = time.perf_counter()
        a_ref = optimal_alpha(delta, merged, experts + [expert], fishers + [fisher])
        ref_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        a_acc = acc.alpha(delta, fisher, merged)
        acc_s = time.perf_counter() - t0
        max_diff = max(max_diff, abs(a_ref - a_acc))
        acc.absorb(fisher, expert)
        experts.append(expert)
        fishers.append(fisher)
        merged = {k: merged[k] + a_acc * delta[k] for k in keys}
    print(
        json.dumps(
            {
                "benchmark": "coefficient_memory",
                "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
                "tasks": args.tasks,
                "adapted_params": len(keys) * shape[0] * shape[1],
                "reference_state_bytes": nbytes(experts) + nbytes(fishers),
                "accumulator_state_bytes": nbytes([acc.phi, acc.psi]),
                "memory_ratio_reference_over_accumulator": (nbytes(experts) + nbytes(fishers))
                / nbytes([acc.phi, acc.psi]),
                "solve_s_last_task": {"reference": round(ref_s, 4), "accumulator": round(acc_s, 4)},
                "max_abs_alpha_difference": max_diff,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
