"""Read a finished (or partly finished) run back: the merged model as dense weights.

    θ̂ = W0 + merged/delta.safetensors       (on the adapted modules; every other weight is W0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pm_ray.atomicdir import atomic_directory
from pm_ray.core.lora import fold_delta
from pm_ray.core.tensors import load_tensors
from pm_ray.rundir import RunDir


def load_merged_model(run_dir: Path) -> tuple[Any, Any, RunDir]:
    from pm_ray.models.backbone import DTYPES, load_backbone

    run = RunDir(run_dir)
    state = run.read_state()
    if state.completed == 0:
        raise ValueError(f"{run.path}: no task has completed yet; nothing to load")
    cfg = run.read_config()
    merged, meta = load_tensors(run.merged_dir / "delta.safetensors")
    if meta.get("task") != state.completed:
        raise ValueError(f"{run.merged_dir / 'delta.safetensors'}: holds task {meta.get('task')}, but state.json has {state.completed} completed")
    model, tokenizer = load_backbone(cfg.model.name_or_path, kind="instruction", dtype=DTYPES[cfg.model.dtype])
    fold_delta(model, merged)
    return model, tokenizer, run


def export_run(run_dir: Path, out: Path) -> Path:
    out = out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: export directory exists and is not empty")
    model, tokenizer, _ = load_merged_model(run_dir)
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return out


def evaluate_run(run_dir: Path, *, max_rows: int | None = None) -> dict[str, Any]:
    from pm_ray.eval import evaluate_task

    model, tokenizer, run = load_merged_model(run_dir)
    cfg, state = run.read_config(), run.read_state()
    tasks = run.load_tasks(state)
    rows = max_rows if max_rows is not None else cfg.eval.max_rows
    return {
        task.name: evaluate_task(model, tokenizer, task, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                                 max_rows=rows, max_length=cfg.trainer.max_length)
        for task in tasks
    }
