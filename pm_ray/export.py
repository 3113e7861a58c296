"""Read a finished (or partly finished) run back: the merged model as dense weights, or as one
PEFT LoRA adapter on the base (see core/lowrank.py for the math).

    θ̂ = W0 + merged/delta.safetensors       (on the adapted modules; every other weight is W0)

Dense export: a plain Hugging Face checkpoint (safetensors, config.json, tokenizer with its chat
template) that `AutoModelForCausalLM.from_pretrained` loads without pm-ray, whatever the backbone
source (a model loaded from a GGUF file is dequantised: its quantizer flags are cleared).
Adapter export: adapter_model.safetensors + adapter_config.json (r = lora_alpha = rank, so PEFT's
scaling is 1 and the factors carry everything) + adapter_error.json (relative Frobenius error per
module against the merged delta) + the tokenizer; `base/` holds the plain base model when the
backbone is not a Hugging Face directory or hub id (bundled GGUF, tiny).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pm_ray.atomicdir import atomic_directory
from pm_ray.core.lora import fold_delta
from pm_ray.core.lowrank import concat_factors, relative_error, truncated_svd
from pm_ray.core.tensors import load_tensors
from pm_ray.models.dense import save_dense
from pm_ray.rundir import RunDir, read_json, write_json

PEFT_PREFIX = "base_model.model."


def run_kind(run: RunDir, state: Any) -> str:
    """'instruction' or 'classification' (a stream holds one kind; the pipeline checks it at load)."""
    return str(read_json(run.data_dir(1, state.task_names[0]) / "task.json")["kind"])


def check_instruction_run(run: RunDir, state: Any) -> None:
    """Export writes causal-LM checkpoints; a classification run's product is its encoder plus one
    head per task, which stay in the run directory."""
    if run_kind(run, state) != "instruction":
        raise ValueError(
            f"{run.path}: a classification run (per-task heads) is not exported; its merged encoder delta is "
            "merged/delta.safetensors and each task's head tasks/<i>-<name>/head.safetensors (`pm-ray eval` "
            "scores it)"
        )


def load_merged_model(run_dir: Path) -> tuple[Any, Any, RunDir]:
    """The backbone with the merged delta folded in; for a classification run, with the head of
    every completed task added back from its file."""
    from pm_ray.models.backbone import DTYPES, load_backbone
    from pm_ray.train.task_heads import TaskHeads

    run = RunDir(run_dir)
    state = run.read_state()
    if state.completed == 0:
        raise ValueError(f"{run.path}: no task has completed yet; nothing to load")
    cfg, kind = run.read_config(), run_kind(run, state)
    merged, _ = load_merged_delta(run)
    model, tokenizer = load_backbone(cfg.model.name_or_path, kind=kind, dtype=DTYPES[cfg.model.dtype])
    fold_delta(model, merged)
    if kind == "classification":
        TaskHeads.for_run(model, cfg, run, run.load_tasks(state), state.completed)
    return model, tokenizer, run


def load_merged_delta(run: RunDir) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = run.read_state()
    merged, meta = load_tensors(run.merged_dir / "delta.safetensors")
    if meta.get("task") != state.completed:
        raise ValueError(
            f"{run.merged_dir / 'delta.safetensors'}: holds task {meta.get('task')}, but state.json has {state.completed} completed"
        )
    return merged, meta


def _write_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh directory `out` atomically (a temporary sibling renamed into place)."""
    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: export directory exists and is not empty")
    with atomic_directory(out) as tmp:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an export is meant to be shared
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
    return out


def export_run(run_dir: Path, out: Path) -> Path:
    run = RunDir(run_dir)
    check_instruction_run(run, run.read_state())
    model, tokenizer, _ = load_merged_model(run_dir)
    return _write_dir(out, lambda tmp: save_dense(model, tokenizer, tmp))


# ---- one LoRA adapter -----------------------------------------------------------------------------


def _adapter_scale(config: dict[str, Any], where: Path) -> float:
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise ValueError(f"{where}: rank_pattern/alpha_pattern/DoRA adapters are not supported (pm-ray writes none)")
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)


def _stack_factors(run: RunDir, stack: list[dict[str, Any]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (A, B) of the concatenated stack: B A = Σ_t α_t s_t B_t A_t (PEFT's layout)."""
    terms: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    for entry in stack:
        adapter_dir = run.path / entry["adapter"]
        scale = _adapter_scale(read_json(adapter_dir / "adapter_config.json"), adapter_dir)
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        for key, A in weights.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
            alpha = entry["alpha"][module] if isinstance(entry["alpha"], dict) else entry["alpha"]
            terms.setdefault(module, []).append((float(alpha) * scale, A, weights[key.replace(".lora_A.", ".lora_B.")]))
    return {module: concat_factors(t) for module, t in terms.items()}


def _base_reference(cfg: Any) -> str | None:
    """What adapter_config.json names as the base, or None when the base must be written to base/."""
    ref = str(cfg.model.name_or_path)
    if ref.startswith(("tiny:", "bundled:")):
        return None
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def export_adapter(run_dir: Path, out: Path, *, rank: int | None = None) -> dict[str, Any]:
    """Write the merged model as one LoRA adapter. Exact concatenation for a line merge (a
    merged/stack.json) unless `rank` is given; otherwise a truncated SVD per module at `rank`
    (default: the sum of the task adapters' ranks). Returns adapter_error.json's content."""
    from pm_ray.models.backbone import DTYPES, load_backbone

    run = RunDir(run_dir)
    state = run.read_state()
    if state.completed == 0:
        raise ValueError(f"{run.path}: no task has completed yet; nothing to export")
    check_instruction_run(run, state)
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    cfg = run.read_config()
    merged, meta = load_merged_delta(run)
    first = run.task_dir(1, state.task_names[0]) / "adapter"
    template = read_json(first / "adapter_config.json")
    fan_in_fan_out = bool(template.get("fan_in_fan_out"))
    stack_path = run.merged_dir / "stack.json"
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    if stack_path.exists() and rank is None:
        method = "exact"
        factors = _stack_factors(run, read_json(stack_path)["stack"])
        if set(factors) != set(merged):
            raise ValueError(f"{stack_path}: the adapters cover {len(factors)} modules, the merged delta {len(merged)}")
    else:
        method = "svd"
        rank = rank or sum(
            read_json(run.task_dir(i, n) / "adapter" / "adapter_config.json")["r"]
            for i, n in enumerate(state.task_names[: state.completed], start=1)
        )
        factors = {}
        for key, delta in merged.items():
            A, B, _ = truncated_svd(delta.T if fan_in_fan_out else delta, rank)
            factors[key] = (A, B)
    r = max(A.shape[0] for A, _ in factors.values())
    for key, (A, B) in factors.items():
        if A.shape[0] < r:  # a module smaller than the rank: pad with zero directions (same product)
            A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)
        delta = merged[key].T if fan_in_fan_out else merged[key]
        modules[key] = {"rank": int(A.shape[0]), "relative_error": relative_error(delta, A, B)}
        tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = B.contiguous()
    errors = [m["relative_error"] for m in modules.values()]
    report = {
        "method": method,
        "rank": r,
        "strategy": meta.get("strategy"),
        "task": state.completed,
        "max_relative_error": max(errors),
        "mean_relative_error": sum(errors) / len(errors),
        "modules": modules,
    }
    base_ref = _base_reference(cfg)
    config = {
        **template,
        "r": r,
        "lora_alpha": float(r),
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "inference_mode": True,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
    }
    base, tokenizer = load_backbone(cfg.model.name_or_path, kind="instruction", dtype=DTYPES[cfg.model.dtype])

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        if base_ref is None:
            save_dense(base, tokenizer, tmp / "base")
            config["base_model_name_or_path"] = str(out.expanduser().resolve() / "base")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        write_json(tmp / "adapter_error.json", report)
        tokenizer.save_pretrained(str(tmp))

    _write_dir(out, write)
    return report


def evaluate_run(run_dir: Path, *, max_rows: int | None = None) -> dict[str, Any]:
    from pm_ray.eval import evaluate_task

    model, tokenizer, run = load_merged_model(run_dir)
    cfg, state = run.read_config(), run.read_state()
    tasks = run.load_tasks(state)
    if run_kind(run, state) == "classification":
        tasks = tasks[: state.completed]  # a task without a head has no classes to score
    rows = max_rows if max_rows is not None else cfg.eval.max_rows
    return {
        task.name: evaluate_task(
            model,
            tokenizer,
            task,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            max_rows=rows,
            max_length=cfg.trainer.max_length,
        )
        for task in tasks
    }
