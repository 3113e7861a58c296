"""The worker loop: one long-lived worker group walks the whole task stream.

For each task t not yet committed in state.json, every worker
  a. sets the adapted weights to W0 + start_t (the merged model θ̂_{t-1}, or the previous expert),
  b. attaches a fresh LoRA_t and trains it with the task-vector perturbation (one forward and one
     backward per step; the perturbation only rescales the LoRA_t branch),
  c. computes its shard of the diagonal empirical Fisher at the expert θ*_t,
  d. sends the Fisher shard (all ranks) and the task vector Δ_t (rank 0) to the merge actors,
  e. loads the merged state back and folds it into the base weights,
  f. evaluates the merged model on every seen task (rows sharded across ranks, exact global sums),
  g. commits the task (rank 0 writes state.json) and reports metrics and a checkpoint.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pm_ray.config import RunConfig
from pm_ray.core.fisher import diagonal_fisher
from pm_ray.core.lora import LoraFactors, base_weight, lora_factors, lora_layers, task_vector
from pm_ray.core.perturbation import Perturbation
from pm_ray.core.strategies import build_strategy
from pm_ray.core.trm import (
    TRMSettings,
    combine,
    expert_coefficient,
    initial_coefficients,
    layer_groups,
    optimize_coefficients,
    snapshot_steps,
    trajectory_directions,
)
from pm_ray.data.readers import load_task
from pm_ray.data.schema import Task
from pm_ray.data.tokenize import batch_iterator, fisher_batches
from pm_ray.eval import evaluate_task
from pm_ray.merge.actor import MergeClient
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora
from pm_ray.rundir import RunDir, RunState, write_json
from pm_ray.train import checkpoints
from pm_ray.train.engine import all_reduce_sum, barrier, broadcast_object, build_engine, world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteLoss(RuntimeError):
    pass


def load_tasks(run: RunDir, state: RunState) -> list[Task]:
    tasks = []
    for i, name in enumerate(state.task_names, start=1):
        d = run.data_dir(i, name)
        meta = json.loads((d / "task.json").read_text())
        tasks.append(load_task(name, meta["kind"], d / "train.parquet", d / "test.parquet"))
    return tasks


def set_adapted_weights(model: torch.nn.Module, w0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
    """W = W0 + delta on every adapted module (a copy, not an accumulation: no drift over tasks)."""
    with torch.no_grad():
        for key, weight0 in w0.items():
            weight = base_weight(model, key)
            update = delta.get(key)
            value = weight0 if update is None else weight0 + update.to(weight0.device, weight0.dtype)
            weight.copy_(value)


def new_adapter(model: Any, cfg: RunConfig, task: int, previous: str | None) -> Any:
    """A fresh LoRA_t (new parameters, seeded identically on every rank); the old one is dropped."""
    name = f"task{task}"
    torch.manual_seed(cfg.trainer.seed * 100_003 + task)
    if previous is None:
        model = attach_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets,
                            dropout=cfg.lora.dropout, adapter_name=name)
    else:
        model.add_adapter(name, model.peft_config[previous])
        model.set_adapter(name)
        model.delete_adapter(previous)
    return model


def trm_merge(model: Any, cfg: RunConfig, settings: TRMSettings, client: MergeClient, task: Task, t: int, tokenizer: Any,
              snapshots: list[dict[str, LoraFactors]], w0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor] | None,
              device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """TRM (our reconstruction): optimise the coefficients of the trajectory subspace on task-t data.

    Rank 0 solves P&M's α_t (the starting point); every rank then runs the same Adam steps on c
    over its own batches with the gradient of c all-reduced, and rank 0 hands θ(c) to the merge.
    """
    rank, world_size = world()
    alpha_pm = broadcast_object(client.alpha(t, delta) if rank == 0 else None)
    merged_prev, _ = client.current()
    if not merged_prev:
        merged_prev = {key: torch.zeros_like(w) for key, w in w0.items()}
    directions = trajectory_directions(merged_prev, snapshots)
    groups = layer_groups(list(w0)) if settings.per_group else None
    c_init = initial_coefficients(settings.snapshots, alpha_pm, groups)
    batches_iter = batch_iterator(task, tokenizer, batch_size=cfg.trainer.batch_size, max_length=cfg.trainer.max_length,
                                  rank=rank, world_size=world_size, seed=cfg.trainer.seed * 7919 + t)
    batches = [next(batches_iter) for _ in range(max(1, min(settings.steps, 4)))]
    with model.disable_adapter():
        c, log = optimize_coefficients(model, directions, w0, batches, c_init, settings,
                                       grad_all_reduce=all_reduce_sum, world_size=world_size, groups=groups)
    merged = {key: value.cpu() for key, value in combine(directions, c.cpu(), groups).items()}
    info: dict[str, Any] = {}
    if rank == 0:
        alpha = expert_coefficient(c.cpu(), groups)  # per module when per_group: splits by shard
        info = client.merge(t, delta, extras={"merged": merged, "coefficients": c.cpu(), "alpha": alpha})
    diag = {"trm_alpha_pm": alpha_pm if not isinstance(alpha_pm, dict) else sum(alpha_pm.values()) / len(alpha_pm),
            "trm_coefficients": c.cpu().tolist()}
    if log:
        diag.update({f"trm_{k}_start": v for k, v in log[0].items() if k != "step"})
        diag.update({f"trm_{k}_end": v for k, v in log[-1].items() if k != "step"})
    return info, diag


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(loop_config["config"])
    run = RunDir(loop_config["run_dir"])
    rank, world_size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.trainer.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    state = run.read_state()
    tasks = load_tasks(run, state)
    client = MergeClient(state.run_name, cfg.merge.shards, cfg.merge.strategy, cfg.merge.options)
    if rank == 0:
        client.sync(state.completed, state.stats_files)  # drop any merge not committed in state.json
    barrier()
    tracker = checkpoints.task_tracker(loop_config, cfg) if rank == 0 else None

    model, tokenizer = load_backbone(cfg.model.name_or_path, kind=tasks[0].kind, dtype=DTYPES[cfg.model.dtype])
    model.to(device)
    perturbation = Perturbation(cfg.perturbation.mode, cfg.perturbation.epsilon, tuple(cfg.perturbation.probs), cfg.trainer.seed)
    adapter: str | None = None
    strategy = build_strategy(cfg.merge.strategy, **cfg.merge.options)
    trm_settings: TRMSettings | None = getattr(strategy, "settings", None) if cfg.merge.strategy == "trm" else None
    snapshot_at = set(snapshot_steps(cfg.trainer.steps_per_task, trm_settings.snapshots)) if trm_settings else set()
    w0: dict[str, torch.Tensor] = {}

    for t, task in enumerate(tasks, start=1):
        if t <= state.completed:
            continue
        t_start = time.time()
        progress = checkpoints.TaskProgress(run, t, len(tasks), task.name, cfg.trainer.steps_per_task, enabled=rank == 0)
        # a. + b. θ_start, then a fresh LoRA_t on top of it
        model = new_adapter(model, cfg, t, adapter)
        adapter = f"task{t}"
        if not w0:
            w0 = {key: base_weight(model, key).detach().clone() for key in lora_layers(model, adapter)}
            if state.completed:
                _, start = client.current()
                set_adapted_weights(model, w0, start)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine = build_engine(cfg.trainer, model, trainable)
        model.train()
        batches = batch_iterator(task, tokenizer, batch_size=cfg.trainer.batch_size, max_length=cfg.trainer.max_length,
                                 rank=rank, world_size=world_size, seed=cfg.trainer.seed * 1009 + t)
        losses: list[float] = []
        snapshots: list[dict[str, LoraFactors]] = []  # TRM's trajectory: LoRA factors only
        diag: dict[str, Any] = {}
        for step in range(cfg.trainer.steps_per_task):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with perturbation.apply(model, rank=rank, step=step, adapter_name=adapter):
                loss = engine.forward_loss(batch)
                engine.backward(loss)
            grad_norm = engine.step()
            if step == 0:  # how responsive the merged start point is to the new task's gradients
                diag["start_grad_norm"] = grad_norm
            if step + 1 in snapshot_at:
                snapshots.append(lora_factors(model, adapter))
            mean_loss = float(all_reduce_sum(loss.detach().float().reshape(1).cpu()).item()) / world_size
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"task {t} ({task.name}): loss is {mean_loss} at step {step}; the task was stopped and "
                                    f"the run keeps the last committed state (task {t - 1})")
            losses.append(mean_loss)
            progress.step(step + 1, mean_loss, write=step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps_per_task - 1)
        n = min(cfg.diagnostics.first_steps, len(losses))
        if n:
            diag["first_steps_loss_drop"] = losses[0] - losses[n - 1]
        diag["train_s"] = time.time() - t_start
        engine.close()

        # c. Fisher shard at the expert θ*_t (LoRA params frozen: no engine hook may fire now)
        for p in trainable:
            p.requires_grad_(False)
        fisher = diagonal_fisher(model, (
            {k: v.to(device) for k, v in b.items()}
            for b in progress.iterate("fisher", fisher_batches(task, tokenizer, num_samples=cfg.fisher.num_samples, batch_size=cfg.fisher.batch_size,
                                                               max_length=cfg.trainer.max_length, rank=rank, world_size=world_size),
                                      checkpoints.fisher_batch_count(task.train.num_rows, cfg.fisher.num_samples, cfg.fisher.batch_size, world_size))
        ), kind="causal_lm" if task.kind == "instruction" else "classification", adapter_name=adapter)

        # d. Fisher shards from every rank, then the merge on rank 0
        progress.phase("merge")
        client.add_fisher(t, fisher, rank)
        barrier()
        merge_info: dict[str, Any] = {}
        delta = None
        if rank == 0:
            delta = task_vector(model, adapter)
            checkpoints.save_adapter(model, adapter, run.task_dir(t, task.name) / "adapter")
        if trm_settings is not None:
            merge_info, trm_diag = trm_merge(model, cfg, trm_settings, client, task, t, tokenizer, snapshots, w0, delta, device)
            diag.update(trm_diag)
        elif rank == 0:
            merge_info = client.merge(t, delta)
        barrier()

        # e. fold the merged state; f. evaluate every seen task with the adapter off
        merged, start_next = client.current()
        set_adapted_weights(model, w0, merged)
        with model.disable_adapter():
            row = [
                evaluate_task(model, tokenizer, tasks[i], batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                              max_rows=cfg.eval.max_rows, rank=rank, world_size=world_size,
                              all_reduce=all_reduce_sum, max_length=cfg.trainer.max_length)["score"]
                for i in progress.iterate("evaluation", range(t), t)
            ]
        set_adapted_weights(model, w0, start_next)

        # g. commit (rank 0), then report from every rank
        if rank == 0:
            state.completed = t
            state.alphas.append(merge_info["alpha"])
            state.accuracy.append(row)
            state.diagnostics.append({"task": t, **diag, **progress.finish(), "task_s": time.time() - t_start, "final_loss": losses[-1]})
            state.stats_files = merge_info["state_files"]
            state.wall_s += time.time() - t_start
            checkpoints.write_merged(run, state, merged, merge_info["is_line"], tasks)
            run.write_state(state)
            checkpoints.prune_stats(run, state)
            if tracker is not None:
                tracker.log_task(t, task.name, losses, merge_info["alpha"], row, state.diagnostics[-1])
        barrier()
        metrics = {"task": t, "loss": losses[-1], "mean_seen_accuracy": sum(row) / len(row)}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                write_json(Path(tmp) / "state.json", json.loads(run.state_path.read_text()))
            checkpoints.report(metrics, tmp if rank == 0 else None, loop_config.get("in_ray_train", True))
