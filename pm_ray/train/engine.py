"""The one seam for distributed training: DeepSpeed ZeRO 0-3, DDP, or a single process.

Each task gets a fresh LoRA adapter (new Parameter objects) and therefore a fresh engine: the
optimizer state must not carry over between tasks, and DeepSpeed/DDP gradient hooks are bound to
the parameters they were built on, so a new adapter means new hooks and no stale ones firing.

    engine = build_engine(cfg.trainer, model, trainable_params, bf16=cfg.model.dtype == "bfloat16")
    loss = engine.forward_loss(batch); engine.backward(loss); engine.step()

bf16 (``model.dtype: bfloat16``): DeepSpeed's ``bf16`` mode on CUDA (bf16 weights, fp32 master
copies of the trainable ones in the optimizer); elsewhere the forward runs under
``torch.autocast(<device>, bfloat16)``. ``trainer.precision: bf16-mixed`` keeps fp32 weights and runs
every forward (training, Fisher, evaluation: ``compute_precision``) under that autocast; ``auto``
picks it only where the hardware has bf16 (``native_bf16``). PEFT keeps the LoRA factors in fp32 over a bf16 base, and
the Fisher, the task vector and the merge are computed in fp32 (pm_ray/core casts).
ZeRO-3 (pm_ray/train/zero3.py) partitions every parameter; small ones are not kept whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pm_ray.config import TrainerSection
from pm_ray.core.answer_logits import answer_logits, takes_logits_mask


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group; (0, 1) in a single process."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (a small picklable object, in memory only)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (a small picklable object), by rank, on every rank."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def uses_deepspeed_bf16(cfg: TrainerSection, bf16: bool) -> bool:
    return bf16 and cfg.engine == "deepspeed" and cfg.use_gpu and torch.cuda.is_available()


def native_bf16(device_type: str) -> bool:
    """Whether this machine runs bfloat16 matmuls in hardware: a CUDA device with bf16, or a CPU with
    AMX or AVX512-BF16. Elsewhere oneDNN emulates bf16, and autocast(bfloat16) is several times
    slower than fp32 (choice scoring 5.8x slower on an AVX2-only EPYC, docs/performance.md)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own CPUID probes
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def forward_device(cfg: TrainerSection) -> str:
    return "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"


def resolved_precision(cfg: TrainerSection) -> str:
    """``trainer.precision`` on the machine this runs on: ``auto`` is bf16-mixed where bf16 is native
    (:func:`native_bf16`), else fp32. Resolved by each worker, on its own node's hardware."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16-mixed" if native_bf16(forward_device(cfg)) else "fp32"


def autocast_device(cfg: TrainerSection, bf16: bool) -> str | None:
    """The device type whose forwards run under autocast(bfloat16), or None (full precision, or
    DeepSpeed's own bf16 mode). ``bf16``: the base weights are bfloat16 (``model.dtype``)."""
    if uses_deepspeed_bf16(cfg, bf16) or not (bf16 or resolved_precision(cfg) == "bf16-mixed"):
        return None
    return forward_device(cfg)


def compute_precision(device_type: str | None) -> contextlib.AbstractContextManager[Any]:
    """The forward context of the Fisher pass and the evaluation (the training step's is the Engine's)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if device_type else contextlib.nullcontext()


def deepspeed_config(cfg: TrainerSection, world_size: int, bf16: bool = False) -> dict[str, Any]:
    """Inline/JSON config from the user, with pm-ray's batch size and ZeRO stage filled in."""
    user: dict[str, Any] = {}
    if isinstance(cfg.deepspeed_config, str):
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise ValueError(f"trainer.deepspeed_config: {path} does not exist")
        user = json.loads(path.read_text())
    elif isinstance(cfg.deepspeed_config, dict):
        user = dict(cfg.deepspeed_config)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        # our own torch AdamW (DeepSpeed's fused CPU/GPU Adams need compiled ops)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        # DeepSpeed keeps every tensor under 1e5 elements whole on every rank by default (all of a
        # tiny model, the norms of a large one): 0 makes what is resident what partitioning says.
        config["zero_optimization"].update(
            {"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}
        )
    if uses_deepspeed_bf16(cfg, bf16):
        config["bf16"] = {"enabled": True}
    config.update(user)
    config.setdefault(
        "train_batch_size",
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world_size,
    )
    return config


class Engine:
    """Forward/backward/step over the wrapped model; ``module`` is the unwrapped PEFT model."""

    def __init__(
        self,
        module: torch.nn.Module,
        wrapped: Any,
        optimizer: torch.optim.Optimizer | None,
        kind: str,
        autocast: str | None = None,
    ) -> None:
        self.module, self.wrapped, self.optimizer, self.kind = module, wrapped, optimizer, kind
        self.autocast = autocast  # a device type whose forward runs under autocast(bfloat16), or None
        # a causal LM that takes logits_to_keep: the LM head runs at the answer positions only
        self.answer_only = takes_logits_mask(module)

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with compute_precision(self.autocast):
            if self.answer_only and "labels" in batch:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                return answer_logits(self.wrapped, inputs, batch["labels"], sliced=True).mean_loss()
            return self.wrapped(**batch).loss.float()

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "deepspeed":
            self.wrapped.backward(loss)
        else:
            loss.backward()

    def step(self) -> float:
        """Apply the update; returns the global L2 norm of the gradients it used."""
        if self.kind == "deepspeed":
            self.wrapped.step()
            # ZeRO moves gradients into partitioned buffers: only the engine knows the global norm
            norm = self.wrapped.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = self._local_grad_norm()
        assert self.optimizer is not None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _local_grad_norm(self) -> float:
        # DDP has already all-reduced (averaged) the gradients: every rank holds the global ones
        total = torch.zeros((), dtype=torch.float64)
        for p in self.module.parameters():
            if p.requires_grad and p.grad is not None:
                total += p.grad.detach().double().pow(2).sum().cpu()
        return float(total.sqrt())

    def close(self) -> None:
        """Remove the engine's hooks (idempotent)."""
        if self.kind == "deepspeed" and hasattr(self.wrapped, "destroy") and not getattr(self, "closed", False):
            self.wrapped.destroy()
        self.closed = True


def use_environment_torch_extensions() -> str | None:
    """Keep DeepSpeed's compiled ops (the CPU shm all-reduce) inside this virtualenv.

    torch builds JIT extensions under ``~/.cache/torch_extensions`` by default, one directory per op
    for every Python environment of the user: two virtualenvs at different paths (a checkout and its
    CI clone) then rebuild the op over each other's build (~25 s on 2 cores) on every first use.
    ``$TORCH_EXTENSIONS_DIR`` set by the user wins; outside a virtualenv the default stays.
    """
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def build_native_ops() -> None:
    """Compile DeepSpeed's CPU shm comm op now (``make native-ops``), where every run will look for it."""
    use_environment_torch_extensions()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def build_engine(
    cfg: TrainerSection, model: torch.nn.Module, params: list[torch.nn.Parameter], bf16: bool = False
) -> Engine:
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    on_gpu = cfg.use_gpu and torch.cuda.is_available()
    autocast = autocast_device(cfg, bf16)
    if cfg.engine == "deepspeed":
        use_environment_torch_extensions()  # before DeepSpeed's comm backend loads its shm op
        import deepspeed

        _, world_size = world()
        wrapped, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg, world_size, bf16)
        )
        return Engine(model, wrapped, ds_optimizer, "deepspeed", autocast)
    if cfg.engine == "ddp" and is_distributed():
        device_ids = [torch.cuda.current_device()] if on_gpu else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return Engine(model, wrapped, optimizer, "ddp", autocast)
    return Engine(model, model, optimizer, "single", autocast)
