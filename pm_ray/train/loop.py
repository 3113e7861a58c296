"""The worker loop: one long-lived worker group walks the whole task stream.

For each task t not yet committed in state.json, every worker
  a. sets the adapted weights to W0 + start_t (the merged model θ̂_{t-1}, or the previous expert),
  b. attaches a fresh LoRA_t and trains it with the task-vector perturbation (one forward and one
     backward per step; it only rescales the LoRA_t branch) and O-LoRA's term if enabled
     (classification streams: with task t's own head, which the merge never touches),
  c. computes its shard of the diagonal empirical Fisher at the expert θ*_t,
  d. sends the Fisher shard (all ranks) and the task vector Δ_t (rank 0) to the merge actors,
  e. loads the merged state back and folds it into the base weights,
  f. evaluates the merged model on every seen task (rows sharded across ranks, exact global sums),
  g. commits the task (rank 0 writes state.json) and reports its metrics to Ray Train.
Parameters are read and written through ``zero3.Weights``: directly, or gathered module by module
under DeepSpeed ZeRO-3, where every rank also runs every forward (pm_ray/train/zero3.py).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterator

import ray
import torch

from pm_ray import interrupt
from pm_ray.config import RunConfig
from pm_ray.core.fisher import diagonal_fisher
from pm_ray.core.lora import LoraFactors, lora_factors, lora_layers, task_vector
from pm_ray.core.perturbation import Perturbation
from pm_ray.core.strategies import build_strategy
from pm_ray.data.ray_dataset import RankTrainingShards
from pm_ray.data.tokenize import BatchDigest, batch_iterator, fisher_batches, task_batch_seed
from pm_ray.eval import evaluate_task
from pm_ray.merge.actor import MergeClient, ensure_merge_actors
from pm_ray.models.backbone import DTYPES
from pm_ray.models.lora import attach_lora
from pm_ray.rundir import RunDir
from pm_ray.tracking import task_tracker
from pm_ray.train import checkpoints, zero3
from pm_ray.train.engine import (
    all_gather_object,
    all_reduce_sum,
    autocast_device,
    barrier,
    broadcast_object,
    build_engine,
    compute_precision,
    deepspeed_config,
    use_environment_torch_extensions,
    world,
)
from pm_ray.train.merge_step import merge_task
from pm_ray.train.orthogonal_state import OrthogonalState
from pm_ray.train.task_heads import TaskHeads


class NonFiniteLoss(RuntimeError):
    pass


def task_loss_kind(task: Any) -> str:
    return "causal_lm" if task.kind == "instruction" else "classification"


def fisher_shard(
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    task: Any,
    progress: Any,
    rank: int,
    world_size: int,
    device: Any,
    adapter: str,
) -> Any:
    """This rank's share of the diagonal Fisher of task ``task`` at the current (expert) weights."""
    batches = fisher_batches(
        task,
        tokenizer,
        num_samples=cfg.fisher.num_samples,
        batch_size=cfg.fisher.batch_size,
        max_length=cfg.trainer.max_length,
        rank=rank,
        world_size=world_size,
    )
    count = checkpoints.fisher_batch_count(
        task.train.num_rows, cfg.fisher.num_samples, cfg.fisher.batch_size, world_size
    )
    return diagonal_fisher(
        model,
        ({k: v.to(device) for k, v in b.items()} for b in progress.iterate("fisher", batches, count)),
        kind=task_loss_kind(task),
        adapter_name=adapter,
    )


def training_batches(
    train_shards: RankTrainingShards | None,
    cfg: RunConfig,
    task: Any,
    t: int,
    tokenizer: Any,
    rank: int,
    world_size: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's training batches of task ``t``; the same batches from either loader.

    ray_data (``train_shards``, when pipeline._fit gave the TorchTrainer its datasets): this rank's
    Ray Dataset of the task, tokenised by Ray Data. local: read from the task table and tokenised here.
    """
    if train_shards is not None:
        return train_shards.batches(t)
    return batch_iterator(
        task,
        tokenizer,
        batch_size=cfg.trainer.batch_size,
        max_length=cfg.trainer.max_length,
        rank=rank,
        world_size=world_size,
        seed=task_batch_seed(cfg.trainer.seed, t),
    )


def new_adapter(model: Any, cfg: RunConfig, task: int, previous: str | None) -> Any:
    """A fresh LoRA_t (new parameters, seeded identically on every rank); the old one is dropped."""
    name = f"task{task}"
    torch.manual_seed(cfg.trainer.seed * 100_003 + task)
    if previous is None:
        model = attach_lora(
            model,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            targets=cfg.lora.targets,
            dropout=cfg.lora.dropout,
            adapter_name=name,
        )
    else:
        model.add_adapter(name, model.peft_config[previous])
        model.set_adapter(name)
        model.delete_adapter(previous)
    return model


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    use_environment_torch_extensions()  # before ZeRO-3's model build or the engine loads DeepSpeed's ops
    cfg = RunConfig.model_validate(loop_config["config"])
    run = RunDir(loop_config["run_dir"])
    rank, world_size = world()
    on_gpu = cfg.trainer.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    state = run.read_state()
    tasks = run.load_tasks(state)
    train_shards = (  # data_loader=ray_data: opened here, so the first task's tokenising overlaps the model load
        RankTrainingShards(rank, cfg.trainer.batch_size, state.completed + 1, len(tasks))
        if loop_config.get("data_loader") == "ray_data"
        else None
    )
    # a shard lost with its node is recreated here (rank 0 chooses and holds the handles that keep it
    # alive, the other ranks look the same actors up by name), and restored from its files by sync
    shards = (
        ensure_merge_actors(
            state.run_name,
            cfg.merge.strategy,
            cfg.merge.options,
            cfg.merge.shards,
            str(run.stats_dir),
            cfg.merge.shard_placement,
        )
        if rank == 0
        else []
    )
    names = broadcast_object([name for name, _ in shards])
    handles = [handle for _, handle in shards] or None
    client = MergeClient(state.run_name, cfg.merge.shards, cfg.merge.strategy, cfg.merge.options, names, handles)
    if rank == 0:
        client.sync(state.completed, state.stats_files)  # drop any merge not committed in state.json
    # where this worker group runs (one entry per rank), recorded with every task it commits
    worker_nodes: list[str] = all_gather_object(ray.get_runtime_context().get_node_id())
    barrier()
    tracker = task_tracker(loop_config, cfg) if rank == 0 else None

    bf16 = cfg.model.dtype == "bfloat16"
    autocast = autocast_device(cfg.trainer, bf16)  # trainer.precision / model.dtype: bf16 forwards
    forward_dtype = "bfloat16" if bf16 or autocast else "float32"  # what `precision: auto` chose here
    weights = zero3.Weights(cfg.trainer.engine == "deepspeed" and cfg.trainer.zero_stage == 3, rank, world_size)
    ds_config = deepspeed_config(cfg.trainer, world_size, bf16) if weights.enabled else {}
    model, tokenizer = weights.load(cfg.model.name_or_path, tasks[0].kind, DTYPES[cfg.model.dtype], device, ds_config)
    perturbation = Perturbation(
        cfg.perturbation.mode, cfg.perturbation.epsilon, tuple(cfg.perturbation.probs), cfg.trainer.seed
    )
    adapter: str | None = None
    strategy = build_strategy(cfg.merge.strategy, **cfg.merge.options)  # what it is: flags and worker step
    record_at = set(strategy.record_steps(cfg.trainer.steps_per_task))
    w0: dict[str, torch.Tensor] = {}
    orth = OrthogonalState.for_run(cfg, run, tasks, state.completed, device)  # O-LoRA: the old tasks' A's
    heads = TaskHeads.for_run(model, cfg, run, tasks, state.completed)  # classification: per-task heads

    for t, task in enumerate(tasks, start=1):
        if t <= state.completed:
            continue
        t_start = time.time()
        progress = checkpoints.TaskProgress(
            run, t, len(tasks), task.name, cfg.trainer.steps_per_task, enabled=rank == 0
        )
        # a. + b. θ_start, then a fresh LoRA_t on top of it
        model = new_adapter(model, cfg, t, adapter)
        adapter = f"task{t}"
        orth.begin_task(t, model, adapter)
        heads.begin_task(t, task)
        if not w0:
            w0 = weights.read_w0(model, list(lora_layers(model, adapter)))
            if state.completed:
                _, start = client.current()
                weights.set_adapted(model, w0, start)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine = build_engine(cfg.trainer, model, trainable, bf16)
        model.train()
        batches = training_batches(train_shards, cfg, task, t, tokenizer, rank, world_size)
        digest = BatchDigest()  # state.json records it: which batches this rank trained on
        losses: list[float] = []
        snapshots: list[dict[str, LoraFactors]] = []  # LoRA_t's trajectory, for a worker step
        diag: dict[str, Any] = {}
        for step in range(cfg.trainer.steps_per_task):
            interrupt.check()  # Ctrl-C / SIGTERM of an in-process run (engine=single)
            batch = next(batches)
            digest.add(batch)
            batch = {k: v.to(device) for k, v in batch.items()}
            with perturbation.apply(model, rank=rank, step=step, adapter_name=adapter):
                loss = engine.forward_loss(batch)
                engine.backward(loss + orth.penalty())  # O-LoRA's terms (0.0 when off)
            grad_norm = engine.step()
            if step == 0:  # how responsive the merged start point is to the new task's gradients
                diag["start_grad_norm"] = grad_norm
            if step + 1 in record_at:
                with weights.lora(model, adapter):
                    snapshots.append(lora_factors(model, adapter))
            mean_loss = float(all_reduce_sum(loss.detach().float().reshape(1).cpu()).item()) / world_size
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(
                    f"task {t} ({task.name}): loss is {mean_loss} at step {step}; the task was stopped and "
                    f"the run keeps the last committed state (task {t - 1})"
                )
            losses.append(mean_loss)
            progress.step(
                step + 1, mean_loss, write=step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps_per_task - 1
            )
        n = min(cfg.diagnostics.first_steps, len(losses))
        if n:
            diag["first_steps_loss_drop"] = losses[0] - losses[n - 1]
        diag["train_s"] = time.time() - t_start
        diag["train_batches_sha256"] = all_gather_object(digest.hexdigest())  # by rank
        diag["forward_dtype"] = forward_dtype
        diag.update(weights.diagnostics(model))  # ZeRO-3: this rank's resident base-weight bytes
        if not weights.enabled:  # ZeRO-3: its hooks gather the weights, until after the evaluation
            engine.close()
        diag.update(orth.end_task(run.task_dir(t, task.name), write=rank == 0))
        heads.end_task(run.task_dir(t, task.name), write=rank == 0)

        # c. Fisher shard at the expert θ*_t (LoRA params frozen: no engine hook may fire now),
        # when the merge uses it (sequential, averaging, ... do not)
        for p in trainable:
            p.requires_grad_(False)
        if strategy.needs_fisher:
            with compute_precision(autocast):
                fisher = fisher_shard(model, tokenizer, cfg, task, progress, rank, world_size, device, adapter)
            weights.pad_fisher(model, tokenizer, cfg.fisher, task.train.num_rows, task_loss_kind(task), adapter)

        # d. Fisher shards from every rank, then the merge on rank 0
        progress.phase("merge")
        if strategy.needs_fisher:
            client.add_fisher(t, fisher, rank)
        barrier()
        delta = None
        with weights.lora(model, adapter):
            if rank == 0:
                delta = task_vector(model, adapter)
                checkpoints.save_adapter(model, adapter, run.task_dir(t, task.name) / "adapter")
        merge_info, merge_diag = merge_task(
            strategy,
            client,
            cfg,
            t=t,
            task=task,
            model=model,
            tokenizer=tokenizer,
            delta=delta,
            w0=w0,
            snapshots=snapshots,
        )
        diag.update(merge_diag)
        barrier()

        # e. fold the merged state; f. evaluate every seen task with the adapter off
        merged, start_next = client.current()
        weights.set_adapted(model, w0, merged)
        with (
            model.disable_adapter(),
            weights.evaluation(model, tokenizer, engine) as reduce,
            compute_precision(autocast),
        ):
            row = [
                evaluate_task(
                    model,
                    tokenizer,
                    tasks[i],
                    batch_size=cfg.eval.batch_size,
                    max_new_tokens=cfg.eval.max_new_tokens,
                    max_rows=cfg.eval.max_rows,
                    rank=rank,
                    world_size=world_size,
                    all_reduce=reduce,
                    max_length=cfg.trainer.max_length,
                )["score"]
                for i in progress.iterate("evaluation", range(t), t)
            ]
        weights.set_adapted(model, w0, start_next)
        engine.close()  # a second close (all but ZeRO-3) does nothing

        # g. commit (rank 0), then report from every rank
        if rank == 0:
            state.completed = t
            state.alphas.append(merge_info["alpha"])
            state.accuracy.append(row)
            state.diagnostics.append(
                {
                    "task": t,
                    **diag,
                    **progress.finish(),
                    "task_s": time.time() - t_start,
                    "final_loss": losses[-1],
                    "worker_nodes": worker_nodes,
                    "merge_nodes": client.node_ids(),
                }
            )
            state.stats_files = merge_info["state_files"]
            state.wall_s += time.time() - t_start
            checkpoints.write_merged(run, state, merged, strategy.keeps_adapter_stack, tasks)
            run.write_state(state)
            checkpoints.prune_stats(run, state)
            if tracker is not None:
                tracker.log_task(t, task.name, losses, merge_info["alpha"], row, state.diagnostics[-1])
        barrier()
        metrics = {"task": t, "loss": losses[-1], "mean_seen_accuracy": sum(row) / len(row)}
        checkpoints.report(metrics, loop_config.get("in_ray_train", True))
