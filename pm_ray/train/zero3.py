"""DeepSpeed ZeRO-3 specifics of the worker loop: parameters partitioned across ranks.

Under stage 3 every parameter holds only its 1/world slice (``p.ds_tensor``); ``p.data`` is empty
except while a module runs (DeepSpeed's hooks all-gather it before the module's forward/backward and
release it after). What that means for pm-ray, and where it is handled:

- building: ``build_backbone`` creates the model under ``HfDeepSpeedConfig`` + ``deepspeed.zero.Init``,
  so parameters are partitioned as each module is constructed; LoRA is attached after.
- the base weights of the adapted modules are read (W0) and written (W0 + merged delta) one
  module at a time inside ``GatheredParameters([weight], modifier_rank=0)``: rank 0's values are
  broadcast and re-partitioned on exit (``gathered_weights`` / ``set_adapted_weights``).
- LoRA factors: we *gather* them (``gathered_lora``) wherever they are read outside a forward (task
  vector, saved adapter, trajectory snapshots). They are tiny (r·(d_in + d_out) per module), so
  gathering all of them at once is cheap; keeping them persistent instead would depend on
  DeepSpeed's size threshold, which also decides the base weights' fate.
- forwards outside the engine (Fisher, evaluation, generation) go through the same hooks, so the
  training engine of a task is kept alive until the task's evaluation is over. The Fisher hooks
  read activations and output gradients, which ZeRO-3 never partitions.
- every rank must run the same sequence of forwards (each forward all-gathers every layer):
  ``Lockstep`` makes a rank that ran out of evaluation rows run dummy forwards while any other rank
  still has real ones; the Fisher pass pads with dummy batches whose results are dropped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from pm_ray.core.fisher import diagonal_fisher
from pm_ray.core.lora import _unwrap, base_weight, lora_layers
from pm_ray.data.tokenize import pad_token_id, shard_indices
from pm_ray.models.backbone import load_backbone
from pm_ray.train.engine import all_reduce_sum, is_distributed

_KEEP: list[Any] = []  # the HfDeepSpeedConfig: transformers only holds a weak reference to it


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def hold_config(ds_config: dict[str, Any]) -> None:
    """Make ``ds_config`` (stage 3) the one transformers sees: ``from_pretrained`` / ``_from_config``
    then build under ``deepspeed.zero.Init`` and load the checkpoint module by module into the
    partitions (pm_ray.models.backbone ``zero3=True``)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed()  # adopts the workers' process group: the config needs the world size
    _KEEP[:] = [HfDeepSpeedConfig(ds_config)]


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """All-gather ``params`` (a no-op for parameters that are not partitioned)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def lora_params(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    return [
        p
        for layer in lora_layers(model, adapter).values()
        for factor in (layer.lora_A[adapter], layer.lora_B[adapter])
        for p in factor.parameters()
    ]


def gathered_lora(model: torch.nn.Module, adapter: str) -> Any:
    """Every factor of ``adapter`` whole, for reading (task vector, snapshots, saved adapter)."""
    return gathered(lora_params(model, adapter))


def read_weights(model: torch.nn.Module, keys: list[str], keep: bool) -> dict[str, torch.Tensor]:
    """W0: a CPU copy of each adapted module's base weight, gathered one module at a time.
    Only the modifier rank needs W0 (``keep``); the others join the gathers and keep nothing."""
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        weight = base_weight(model, key)
        with gathered([weight]):
            out[key] = weight.detach().to("cpu").clone() if keep else torch.empty(0)
    return out


def set_adapted_weights(
    model: torch.nn.Module, w0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], modifier: bool
) -> None:
    """W = W0 + delta module by module; rank 0 (``modifier``) writes, the others receive it."""
    for key, weight0 in w0.items():
        weight = base_weight(model, key)
        with gathered([weight], modifier_rank=0), torch.no_grad():
            if modifier:
                update = delta.get(key)
                value = weight0 if update is None else weight0.float() + update.float()
                weight.copy_(value.to(weight.device, weight.dtype))


def resident_bytes(model: torch.nn.Module) -> dict[str, int]:
    """This rank's bytes of base (non-LoRA) parameters: the partitions it holds, any whole copy it
    holds right now, and the full model's size, to check partitioning from inside a run."""
    resident = full = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        size = p.element_size()
        numel = int(getattr(p, "ds_numel", p.numel()))
        full += numel * size
        partition = p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else 0
        resident += (partition + (p.data.numel() if is_partitioned(p) else numel)) * size
    return {"base_resident_bytes": resident, "base_full_bytes": full}


class Lockstep:
    """Every rank in every forward: before each real forward a rank votes 1 in an all-reduce; a
    rank with nothing left to run (``drain``) votes 0 and runs a dummy one-token forward while the
    sum is positive. Rounds line up because each is one all-reduce plus one forward on every rank.
    ``all_reduce`` drains first, so it can be handed to code that reduces after its forwards."""

    def __init__(self, model: torch.nn.Module, pad_id: int, device: torch.device) -> None:
        self.inner = _unwrap(model)
        self.dummy = {
            "input_ids": torch.full((1, 1), pad_id, dtype=torch.long, device=device),
            "attention_mask": torch.ones((1, 1), dtype=torch.long, device=device),
        }
        self.voting = True
        self.hook = self.inner.register_forward_pre_hook(self._before_forward)

    def _vote(self, value: int) -> int:
        return int(all_reduce_sum(torch.tensor([value], dtype=torch.int64)).item())

    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self.voting:
            self._vote(1)

    def drain(self) -> None:
        if not is_distributed():
            return
        self.voting = False
        try:
            while self._vote(0) > 0:
                with torch.no_grad():
                    self.inner(**self.dummy)
        finally:
            self.voting = True

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.drain()
        return all_reduce_sum(tensor)

    def close(self) -> None:
        self.hook.remove()


def _plain_set_adapted_weights(
    model: torch.nn.Module, w0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
) -> None:
    """W = W0 + delta on every adapted module (a copy, not an accumulation: no drift over tasks)."""
    with torch.no_grad():
        for key, weight0 in w0.items():
            weight = base_weight(model, key)
            update = delta.get(key)
            value = weight0 if update is None else weight0 + update.to(weight0.device, weight0.dtype)
            weight.copy_(value)


class Weights:
    """How the worker loop reaches parameters: directly, or (``enabled``: ZeRO-3) gathered."""

    def __init__(self, enabled: bool, rank: int, world_size: int) -> None:
        self.enabled, self.rank, self.world_size = enabled, rank, world_size

    def load(
        self, name: str, kind: str, dtype: torch.dtype, device: torch.device, ds_config: dict[str, Any]
    ) -> tuple[torch.nn.Module, Any]:
        if not self.enabled:
            model, tokenizer = load_backbone(name, kind=kind, dtype=dtype)
            return model.to(device), tokenizer
        hold_config(ds_config)  # zero.Init places each partition on this rank's device
        return load_backbone(name, kind=kind, dtype=dtype, zero3=True)

    def read_w0(self, model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return {key: base_weight(model, key).detach().clone() for key in keys}
        return read_weights(model, keys, keep=self.rank == 0)

    def set_adapted(self, model: torch.nn.Module, w0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
        if self.enabled:
            set_adapted_weights(model, w0, delta, modifier=self.rank == 0)
        else:
            _plain_set_adapted_weights(model, w0, delta)

    def lora(self, model: torch.nn.Module, adapter: str) -> Any:
        """A block in which ``adapter``'s factors can be read (a collective under ZeRO-3)."""
        return gathered_lora(model, adapter) if self.enabled else contextlib.nullcontext()

    def pad_fisher(
        self, model: torch.nn.Module, tokenizer: Any, fisher: Any, train_rows: int, kind: str, adapter: str
    ) -> None:
        """Dummy Fisher passes (results dropped) so that this rank runs as many as rank 0, which
        holds the largest round-robin share of the Fisher rows (``fisher``: the FisherSection)."""
        if not self.enabled:
            return
        rows, batch_size = min(fisher.num_samples, train_rows), fisher.batch_size
        batches = [math.ceil(len(shard_indices(rows, r, self.world_size)) / batch_size) for r in range(self.world_size)]
        device = next(model.parameters()).device
        ids = torch.full((1, 2), pad_token_id(tokenizer), dtype=torch.long, device=device)
        for _ in range(max(batches) - batches[self.rank]):
            diagonal_fisher(model, [{"input_ids": ids, "labels": ids}], kind=kind, adapter_name=adapter)

    @contextlib.contextmanager
    def evaluation(self, model: torch.nn.Module, tokenizer: Any, engine: Any) -> Iterator[Any]:
        """Yields the all-reduce to hand to ``evaluate_task``; under ZeRO-3 a ``Lockstep`` one.

        The engine's hook on the root module resets DeepSpeed's fetch trace (with a collective
        while the trace is being recorded) on forwards that enter through the root (scoring) and
        not on those that do not (``generate``, the dummy forward): every rank must do the same,
        so that hook is removed for the evaluation (the engine is closed right after it)."""
        if not self.enabled:
            yield all_reduce_sum
            return
        offload = getattr(getattr(engine.wrapped, "optimizer", None), "parameter_offload", None)
        if offload is not None:
            offload.fwd_pre_hook.remove()
        lockstep = Lockstep(model, pad_token_id(tokenizer), next(model.parameters()).device)
        try:
            yield lockstep.all_reduce
        finally:
            lockstep.close()

    def diagnostics(self, model: torch.nn.Module) -> dict[str, int]:
        return resident_bytes(model) if self.enabled else {}
