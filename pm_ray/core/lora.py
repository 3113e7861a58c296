"""LoRA task vectors and folding them into the dense base weights.

A LoRA adapter on module m carries A (r x d_in), B (d_out x r) and scale s = lora_alpha / r (or
lora_alpha / sqrt(r) with rsLoRA; we read PEFT's ``scaling`` so either is right). Its task vector is

    Δ_m = s · B A                                   (dense, d_out x d_in)

transposed to (d_in x d_out) when the base layer stores its weight that way (``fan_in_fan_out``,
GPT-2 ``Conv1D``), so every dense tensor here has the layout of the base layer's ``weight``.
A and B are never merged separately: (Σ α_i B_i)(Σ α_i A_i) ≠ Σ α_i B_i A_i (cross terms).

Folding a stack of adapters into the base weights, module by module:

    W_m ← W_m + Σ_i α_{i,m} · s_i B_{i,m} A_{i,m}

Keys of every per-module dict are the *base model's* module names with PEFT's wrapper prefix
removed: ``"base_model.model.model.layers.0.self_attn.k_proj"`` -> ``"model.layers.0.self_attn.k_proj"``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

_PEFT_PREFIX = "base_model.model."
_BASE_LAYER_SEGMENT = ".base_layer"


def normalize_module_name(name: str) -> str:
    """The base model's module name for a (possibly PEFT-wrapped) module name.

    Removes the ``PeftModel`` prefix ``"base_model.model."`` and any ``".base_layer"`` segment that
    PEFT inserts between a LoRA wrapper and the layer it wraps.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    # A base_layer segment only ever ends a wrapper's path, so removing every occurrence is safe.
    while _BASE_LAYER_SEGMENT + "." in name:
        name = name.replace(_BASE_LAYER_SEGMENT + ".", ".")
    if name.endswith(_BASE_LAYER_SEGMENT):
        name = name[: -len(_BASE_LAYER_SEGMENT)]
    return name


@functools.cache
def _peft() -> dict[str, Any]:
    """PEFT's classes, imported on first use: a merge actor imports this module for its names and
    never touches a model, and importing peft (and transformers under it) costs it ~2.5 s a start."""
    from peft import PeftMixedModel, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    return {"wrappers": (PeftModel, PeftMixedModel), "tuner": BaseTuner, "layer": LoraLayer}


def is_lora_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, _peft()["layer"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / DeepSpeed / PEFT wrappers, whose module names are the keys."""
    seen = 0
    while seen < 8:  # wrappers nest at most a few deep; the bound guards against cycles
        seen += 1
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
            continue
        # PeftModel.base_model is the LoraModel (a BaseTuner); LoraModel.model is the HF model.
        if isinstance(model, _peft()["wrappers"]):
            model = model.base_model
            continue
        if isinstance(model, _peft()["tuner"]):
            model = model.model
            continue
        break
    return model


def lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """Every LoRA layer that carries ``adapter_name``, keyed by the base model's module name.

    Only plain linear LoRA is supported (the task vector must be s·B A exactly): a LoRA on an
    embedding or convolution, a DoRA/other variant, or ``lora_bias`` raises ValueError.
    """
    layers: dict[str, LoraLayer] = {}
    for name, module in _unwrap(model).named_modules():
        if not is_lora_layer(module):
            continue
        carries = adapter_name in module.lora_A or adapter_name in getattr(module, "lora_embedding_A", {})
        if not carries:
            continue
        key = normalize_module_name(name)
        if adapter_name not in module.lora_A or not isinstance(module.lora_A[adapter_name], torch.nn.Linear):
            raise ValueError(
                f"module {key!r}: adapter {adapter_name!r} is a {type(module).__name__} LoRA; "
                "only LoRA on linear layers (nn.Linear / Conv1D) is supported"
            )
        if adapter_name in getattr(module, "lora_variant", {}):
            raise ValueError(
                f"module {key!r}: adapter {adapter_name!r} uses the LoRA variant "
                f"{type(module.lora_variant[adapter_name]).__name__} (e.g. DoRA); expected plain LoRA "
                "whose task vector is scaling * B @ A"
            )
        if getattr(module, "lora_bias", {}).get(adapter_name, False):
            raise ValueError(f"module {key!r}: adapter {adapter_name!r} has lora_bias=True; expected lora_bias=False")
        layers[key] = module
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} is on no LoRA layer of {type(model).__name__}")
    return layers


@dataclass
class LoraFactors:
    """The small factors of one module's adapter: Δ = scaling · B A (transposed if fan_in_fan_out)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LoraFactors: expected A (r x d_in) and B (d_out x r) with the same r, "
                f"got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the dense delta (the base weight's shape)."""
        d_out, d_in = self.B.shape[0], self.A.shape[1]
        return (d_in, d_out) if self.fan_in_fan_out else (d_out, d_in)

    def delta(self) -> torch.Tensor:
        """The dense task vector scaling · B @ A in the base weight's layout."""
        dense = (self.B @ self.A) * self.scaling
        return dense.T.contiguous() if self.fan_in_fan_out else dense


def _factors_of(layer: LoraLayer, adapter_name: str) -> LoraFactors:
    return LoraFactors(
        A=layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float32).clone(),
        B=layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float32).clone(),
        scaling=float(layer.scaling[adapter_name]),
        fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
    )


def lora_factors(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """Detached float32 CPU copies of each module's (A, B, scaling) for ``adapter_name``."""
    return {key: _factors_of(layer, adapter_name) for key, layer in lora_layers(model, adapter_name).items()}


def task_vector(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Dense Δ_m = scaling · B A per adapted module (float32, CPU, base-weight layout)."""
    return {key: factors.delta() for key, factors in lora_factors(model, adapter_name).items()}


def base_weight(model: torch.nn.Module, key: str) -> torch.nn.Parameter:
    """The dense base weight of module ``key`` on a PEFT-wrapped or a plain model."""
    root = _unwrap(model)
    try:
        module = root.get_submodule(normalize_module_name(key))
    except AttributeError as err:
        raise ValueError(f"module {key!r} does not exist in {type(root).__name__}") from err
    if is_lora_layer(module):
        module = module.get_base_layer()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        raise ValueError(f"module {key!r} ({type(module).__name__}) has no dense weight parameter")
    return weight


def _alpha_for(alpha: float | Mapping[str, float], key: str, where: str) -> float:
    if isinstance(alpha, Mapping):
        if key not in alpha:
            raise ValueError(f"{where}: alpha has no entry for module {key!r}; expected one per module")
        return float(alpha[key])
    return float(alpha)


def _check_alpha_keys(alpha: float | Mapping[str, float], keys: set[str], where: str) -> None:
    if isinstance(alpha, Mapping):
        missing = sorted(keys - set(alpha))
        extra = sorted(set(alpha) - keys)
        if missing or extra:
            raise ValueError(
                f"{where}: per-module alpha is missing modules {missing[:5]}, has unknown modules {extra[:5]}"
            )


def _add_into(weight: torch.nn.Parameter, update: torch.Tensor) -> None:
    # Add in float32 and round once, so a bf16/fp16 base does not round the delta before the sum.
    summed = weight.detach().to(torch.float32) + update.to(weight.device, torch.float32)
    weight.copy_(summed.to(weight.dtype))


def fold_delta(
    model: torch.nn.Module,
    delta: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float] = 1.0,
) -> None:
    """W_m += α_m · delta_m in place for every key of ``delta``.

    Everything is validated before the first weight changes, so bad input leaves the model as it was.
    """
    _check_alpha_keys(alpha, set(delta), "fold_delta")
    weights: dict[str, torch.nn.Parameter] = {}
    for key, tensor in delta.items():
        weight = base_weight(model, key)
        if tuple(tensor.shape) != tuple(weight.shape):
            raise ValueError(
                f"fold_delta: delta[{key!r}] has shape {tuple(tensor.shape)}, expected {tuple(weight.shape)} "
                "(the base weight's layout)"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"fold_delta: delta[{key!r}] contains NaN or Inf values")
        weights[key] = weight
    with torch.no_grad():
        for key, weight in weights.items():
            _add_into(weight, _alpha_for(alpha, key, "fold_delta") * delta[key].to(torch.float32))


def fold_adapters(
    model: torch.nn.Module,
    stack: Sequence[tuple[float | Mapping[str, float], Mapping[str, LoraFactors]]],
) -> None:
    """W_m += Σ_i α_{i,m} · Δ_{i,m} for a stack of (alpha, factors), one module at a time.

    Only one module's dense delta exists at any moment, so the memory cost is one weight, not the
    whole stack of dense task vectors. All keys and shapes are checked before anything is written.
    """
    weights: dict[str, torch.nn.Parameter] = {}
    for index, (alpha, factors) in enumerate(stack):
        where = f"fold_adapters: stack[{index}]"
        _check_alpha_keys(alpha, set(factors), where)
        for key, factor in factors.items():
            if not isinstance(factor, LoraFactors):
                raise ValueError(f"{where}[{key!r}] is a {type(factor).__name__}, expected LoraFactors")
            weight = weights[key] if key in weights else base_weight(model, key)
            if factor.shape != tuple(weight.shape):
                raise ValueError(
                    f"{where}[{key!r}] gives a delta of shape {factor.shape}, expected {tuple(weight.shape)}"
                )
            weights[key] = weight
    with torch.no_grad():
        for key, weight in weights.items():
            update = torch.zeros(weight.shape, dtype=torch.float32)
            for index, (alpha, factors) in enumerate(stack):
                if key in factors:
                    coefficient = _alpha_for(alpha, key, f"fold_adapters: stack[{index}]")
                    update += coefficient * factors[key].delta().to(torch.float32)
            _add_into(weight, update)
