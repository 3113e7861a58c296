"""O-LoRA on a training worker: the frozen A matrices of the finished tasks and the penalty on LoRA_t.

    orth = OrthogonalState.for_run(cfg, run, tasks, state.completed, device)   # loads tasks ≤ completed
    orth.begin_task(t, model, adapter)       # after the fresh LoRA_t is attached
    engine.backward(loss + orth.penalty())   # λ₁ Σ_{i<t} Σ_m ‖A_i A_tᵀ‖²_F + λ₂ ‖A_t, B_t‖² (0.0 when off)
    diag.update(orth.end_task(task_dir, write=rank == 0))   # keeps A_t; rank 0 writes it

Every task's A matrices go to ``tasks/<i>-<name>/lora_A.safetensors`` (atomic: temporary file,
fsync, rename) before state.json commits the task, so a resumed run (or a Ray Train retry, which
restarts this loop) loads the A's of exactly the committed tasks. Every rank keeps its own copy in
memory (the ranks' LoRA_t are identical after a synchronised update), so no rank reads a file
another rank has just written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pm_ray.config import RunConfig
from pm_ray.core.lora import lora_layers
from pm_ray.core.orthogonal import check_old_layout, olora_penalty, orthogonality_loss, overlap
from pm_ray.core.tensors import TensorDict, load_tensors, save_tensors
from pm_ray.rundir import RunDir

LORA_A_FILE = "lora_A.safetensors"


class OrthogonalState:
    """The A's of tasks 1..t-1 (CPU float32 copies, and on the device for the current task)."""

    def __init__(self, enabled: bool, lam: float = 0.0, l2: float = 0.0, device: torch.device | None = None) -> None:
        self.enabled, self.lam, self.l2 = enabled, lam, l2
        self.device = device or torch.device("cpu")
        self.saved: dict[int, TensorDict] = {}  # task index -> its A per module (CPU float32)
        self.task = 0
        self.old: list[TensorDict] = []  # the A's of tasks < self.task, on the device
        self.new_a: dict[str, torch.nn.Parameter] = {}
        self.new_b: dict[str, torch.nn.Parameter] = {}

    @classmethod
    def for_run(
        cls, cfg: RunConfig, run: RunDir, tasks: list[Any], completed: int, device: torch.device
    ) -> OrthogonalState:
        """Disabled unless the config trains orthogonally; else with the committed tasks' A's loaded."""
        if not cfg.orthogonal_training():
            return cls(False)
        state = cls(True, cfg.orthogonal.lam, cfg.orthogonal.l2, device)
        for i in range(1, completed + 1):
            path = run.task_dir(i, tasks[i - 1].name) / LORA_A_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: missing; O-LoRA needs the A matrices of every committed task (1..{completed}) "
                    "to resume this run"
                )
            tensors, meta = load_tensors(path)
            if meta.get("kind") != "lora_A" or meta.get("task") != i:
                raise ValueError(f"{path}: holds {meta!r}, expected the LoRA A matrices of task {i}")
            state.saved[i] = {key: t.float() for key, t in tensors.items()}
        return state

    def begin_task(self, t: int, model: Any, adapter: str) -> None:
        """Bind to LoRA_t's parameters and move the A's of tasks < t to the device (once per task)."""
        if not self.enabled:
            return
        layers = lora_layers(model, adapter)
        self.new_a = {key: layer.lora_A[adapter].weight for key, layer in layers.items()}
        self.new_b = {key: layer.lora_B[adapter].weight for key, layer in layers.items()}
        self.task = t
        self.old = [{key: a.to(self.device) for key, a in self.saved[i].items()} for i in sorted(self.saved) if i < t]
        check_old_layout(self.new_a, self.old)

    def penalty(self) -> torch.Tensor | float:
        """λ₁ L_orth + λ₂ L_L2 on LoRA_t, to add to the task loss (the float 0.0 when disabled)."""
        if not self.enabled:
            return 0.0
        return olora_penalty(self.new_a, self.new_b, self.old, lam=self.lam, l2=self.l2)

    def end_task(self, task_dir: Path, write: bool) -> dict[str, float]:
        """Keep A_t for the later tasks (every rank) and write it to ``task_dir`` (``write``: rank 0);
        returns the diagnostics: the unweighted L_orth and the scale-free overlap of the trained A_t."""
        if not self.enabled:
            return {}
        a_t = {key: a.detach().to("cpu", torch.float32).clone() for key, a in self.new_a.items()}
        self.saved[self.task] = a_t
        if write:
            save_tensors(task_dir / LORA_A_FILE, a_t, {"kind": "lora_A", "task": self.task})
        if not self.old:
            return {}
        with torch.no_grad():
            l_orth = float(orthogonality_loss(self.new_a, self.old))
        return {"orth_loss": l_orth, "orth_overlap": overlap(a_t, self.old)}
