"""Cost of the P&M merge (strategy 'pm') at task 2 against task 20, with 1 and 4 merge shards.

Adapted-weight shapes are SmolLM2-135M's, read from the bundled model's config (GGUF metadata,
no weights loaded; the published values are the fallback): the k,v projections (the default
targets) and every linear layer of the decoder (q, k, v, o, gate, up, down). Each shard is a
pm_ray.merge.actor.MergeShard called in-process (no Ray); the global α is solved as MergeClient
does it (every shard's partials, add_partials, solve_alpha) and every shard then merges with it.

A shard is brought to task 1 and another to task 19 with real merges, then the merge of task 2
and of task 20 are timed alternately (A B A B ...): each timed merge restores the shard's state
afterwards (θ̂, Φ and Ψ are updated in place, so they are cloned first). The Δ_t and
F_t of every task are the same random tensors (the cost does not depend on their values).
Memory: peak RSS above the RSS before the merge, sampled every 2 ms by a thread (torch's CPU
allocator bypasses tracemalloc). The yardstick is ``{k: a[k] + b[k]}`` over the same modules.
Minor page faults (first touches of memory the allocator got fresh from the kernel) are counted
in both timed regions: they cost microseconds each, and which side meets them depends on what
the allocator has free at that moment, not on the work.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/merge_cost.py --targets kv --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import threading
import time

import psutil
import torch

from pm_ray.core.coefficient import add_partials
from pm_ray.merge.actor import MergeShard, shard_keys

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
}


# The least a P&M merge must read and write, in module-sized float32 tensors: it reads Δ_t, F_t,
# θ̂_{t-1}, Φ, Ψ and writes θ̂_t, Φ, Ψ. The yardstick a + b reads two and writes one.
MERGE_TENSOR_PASSES = 8
ADD_TENSOR_PASSES = 3


def smollm2_config() -> tuple[dict[str, int], str]:
    try:
        from transformers import AutoConfig

        from pm_ray.models.backbone import bundled_model_dir

        model_dir, entry = bundled_model_dir("smollm2-135m-instruct")
        c = AutoConfig.from_pretrained(str(model_dir), gguf_file=entry.gguf_file)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return {k: int(getattr(c, k)) for k in SMOLLM2_135M if k != "head_dim"} | {"head_dim": head_dim}, "gguf"
    except Exception as exc:  # noqa: BLE001 - the published config is a fine fallback
        return dict(SMOLLM2_135M), f"published values ({type(exc).__name__})"


def adapted_shapes(c: dict[str, int], targets: str) -> dict[str, tuple[int, int]]:
    h, kv, inter = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
    q = c["num_attention_heads"] * c["head_dim"]
    per_layer = {"self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h)}
    if targets == "all-linear":
        per_layer |= {
            "self_attn.q_proj": (q, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (inter, h),
            "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter),
        }
    return {f"model.layers.{i}.{name}": s for i in range(c["num_hidden_layers"]) for name, s in per_layer.items()}


class PeakRss:
    """Peak RSS above the starting RSS while the block runs (a sampling thread)."""

    def __enter__(self) -> PeakRss:
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta_mib = (self.peak - self.base) / 2**20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def split(tensors: dict[str, torch.Tensor], keys: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    return [{k: tensors[k] for k in part} for part in keys]


def merge_all(
    shards: list[MergeShard], keys: list[list[str]], task: int, delta, fisher, count: int, save_dir: str | None
) -> dict:
    """MergeClient.merge's work, in-process: Fisher in, two-phase global α, every shard merges."""
    parts = split(delta, keys)
    for shard, f in zip(shards, split(fisher, keys)):
        shard.add_fisher(task, f, count, 0)
    alpha = shards[0].strategy.solve_alpha(add_partials(*[s.partials(task, p) for s, p in zip(shards, parts)]))
    out = {"alpha": alpha, "per_shard_s": []}
    for shard, p in zip(shards, parts):
        t0 = time.perf_counter()
        shard.strategy.merge(shard._update(task, p), alpha=alpha)
        if save_dir is not None:  # MergeShard.merge also writes the shard's state file
            shard.strategy.save(os.path.join(save_dir, f"shard{shard.shard}-task{task}.safetensors"))
        out["per_shard_s"].append(time.perf_counter() - t0)
    return out


def snapshot(shards: list[MergeShard]) -> list[tuple]:
    """Copies of what a merge changes in place (the shard's strategy updates θ̂, Φ and Ψ in place)."""
    return [
        (
            {k: v.clone() for k, v in s.strategy.merged.items()},
            s.strategy.start is s.strategy.merged,
            s.strategy.num_tasks,
            s.strategy.accumulator.num_tasks,
            {k: v.clone() for k, v in s.strategy.accumulator.phi.items()},
            {k: v.clone() for k, v in s.strategy.accumulator.psi.items()},
        )
        for s in shards
    ]


def restore(shards: list[MergeShard], snap: list[tuple]) -> None:
    for s, (merged, start_is_merged, n, acc_n, phi, psi) in zip(shards, snap):
        assert start_is_merged  # pm: task t+1 trains from θ̂_t
        s.strategy.merged, s.strategy.start, s.strategy.num_tasks = merged, merged, n
        s.strategy.accumulator.num_tasks, s.strategy.accumulator.phi, s.strategy.accumulator.psi = acc_n, phi, psi


def summary(values: list[float], digits: int = 4) -> dict[str, float]:
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", choices=["kv", "all-linear"], default="kv")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--late-task", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--save", action="store_true", help="include MergeShard's state-file write")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own); Ray starts a merge actor (num_cpus=0) with OMP_NUM_THREADS=1",
    )
    parser.add_argument("--machine", default="", help="free text naming the machine, copied to the JSON")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config, config_source = smollm2_config()
    shapes = adapted_shapes(config, args.targets)
    numel = sum(a * b for a, b in shapes.values())
    gen = torch.Generator().manual_seed(0)
    delta = {k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    fisher = {k: torch.rand(s, generator=gen) ** 2 for k, s in shapes.items()}
    tmp = tempfile.mkdtemp(prefix="merge_cost_")
    results: dict = {}
    for n_shards in args.shards:
        keys = shard_keys(list(shapes), n_shards)
        sides = {}
        for label, before in (("task2", 1), (f"task{args.late_task}", args.late_task - 1)):
            shards = [MergeShard("pm", {}, k, n_shards, tmp) for k in range(n_shards)]
            for t in range(1, before + 1):
                merge_all(shards, keys, t, delta, fisher, 32, None)
            sides[label] = (shards, before + 1)
        state_bytes = {
            label: sum(
                t.numel() * t.element_size()
                for s in sh
                for d in (s.strategy.merged, s.strategy.accumulator.phi, s.strategy.accumulator.psi)
                for t in d.values()
            )
            for label, (sh, _) in sides.items()
        }
        times: dict[str, list[float]] = {label: [] for label in sides}
        faults: dict[str, list[int]] = {label: [] for label in sides}
        add_faults: list[int] = []
        shard_max: dict[str, list[float]] = {label: [] for label in sides}
        peaks: dict[str, list[float]] = {label: [] for label in sides}
        add_s: list[float] = []
        for _ in range(args.repeats):
            for label, (shards, task) in sides.items():
                snap = snapshot(shards)
                with PeakRss() as rss:
                    f0, t0 = minor_faults(), time.perf_counter()
                    out = merge_all(shards, keys, task, delta, fisher, 32, tmp if args.save else None)
                    times[label].append(time.perf_counter() - t0)
                    faults[label].append(minor_faults() - f0)
                shard_max[label].append(max(out["per_shard_s"]))
                peaks[label].append(rss.delta_mib)
                restore(shards, snap)
                del snap
            f0, t0 = minor_faults(), time.perf_counter()
            added = {k: delta[k] + fisher[k] for k in shapes}
            add_s.append(time.perf_counter() - t0)
            add_faults.append(minor_faults() - f0)
            del added
        early, late = "task2", f"task{args.late_task}"
        results[f"{n_shards}_shards"] = {
            "merge_s": {label: summary(v) for label, v in times.items()},
            "slowest_shard_merge_s": {label: summary(v) for label, v in shard_max.items()},
            "peak_rss_delta_mib": {label: summary(v, 1) for label, v in peaks.items()},
            "state_bytes_kept": state_bytes,
            "time_growth_late_over_early": round(statistics.median(times[late]) / statistics.median(times[early]), 3),
            "memory_growth_late_over_early": round(
                max(statistics.median(peaks[late]), 1.0) / max(statistics.median(peaks[early]), 1.0), 3
            ),
            "plain_add_s": summary(add_s),
            # first touches of fresh memory (4 KiB pages) in the timed region: what the allocator
            # hands out decides them, and each costs microseconds
            "minor_page_faults_median": {
                "merge": {label: int(statistics.median(v)) for label, v in faults.items()},
                "plain_add": int(statistics.median(add_faults)),
            },
            "add_over_merge_throughput": {
                "min": round(min(add_s) / statistics.median(times[late]), 3),
                "median": round(statistics.median(add_s) / statistics.median(times[late]), 3),
            },
            # bytes/s of the merge over bytes/s of the add: the merge must touch MERGE_TENSOR_PASSES
            # module-sized float32 tensors at least, the add ADD_TENSOR_PASSES
            "throughput_vs_add_same_bytes": {
                "min": round(min(add_s) * MERGE_TENSOR_PASSES / ADD_TENSOR_PASSES / min(times[late]), 3),
                "median": round(
                    statistics.median(add_s) * MERGE_TENSOR_PASSES / ADD_TENSOR_PASSES / statistics.median(times[late]),
                    3,
                ),
            },
        }
        del sides
    print(
        json.dumps(
            {
                "benchmark": "merge_cost",
                "machine": f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                f"load average {os.getloadavg()[0]:.1f} at end" + (f"; {args.machine}" if args.machine else ""),
                "other_load_present": True,
                "model_shapes": f"SmolLM2-135M ({config_source})",
                "config": config,
                "targets": args.targets,
                "adapted_modules": len(shapes),
                "adapted_params": numel,
                "tensor_mib": round(numel * 4 / 2**20, 1),
                "includes_state_file_write": args.save,
                "repeats": args.repeats,
                "note": "shards run one after another in one process; 'slowest shard' is the time K parallel actors "
                "would take. add_over_merge_throughput = plain add time / merge time at the late task (the same modules); "
                "throughput_vs_add_same_bytes scales the add to the bytes the merge must touch (8 tensor passes against "
                "the add's 3) and is the figure held to the >= 0.5 target. "
                "Memory growth is the ratio of peak-RSS deltas (floored at 1 MiB).",
                "shards": results,
                "targets_issue": {"growth": "<= 1.1", "throughput_vs_add": ">= 0.5"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
