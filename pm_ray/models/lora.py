"""LoRA attachment with per-architecture default targets (attention k, v as in the P&M paper)."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from pm_ray.models.heads import TaskHeadClassifier

# model_type -> attention key/value projection module names. Fused-qkv architectures (gpt2,
# gpt_neox, falcon, phi3) only have the fused projection, so q is adapted as well there.
KV_TARGETS: dict[str, list[str]] = {
    **{
        t: ["k_proj", "v_proj"]
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "opt",
            "olmo",
            "olmo2",
            "smollm3",
            "granite",
        )
    },
    **{t: ["key", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "vit", "deit")},
    "distilbert": ["k_lin", "v_lin"],
    "t5": ["k", "v"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "phi3": ["qkv_proj"],
}
ALL_LINEAR = "all-linear"


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"{type(model).__name__} has no config.model_type; pass LoRA targets explicitly")
    return str(model_type)


def default_lora_targets(model: nn.Module) -> list[str]:
    """Attention key and value projections of `model`'s architecture."""
    model_type = _model_type(model)
    if model_type not in KV_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r}; pass targets explicitly "
            f"(module names, or {ALL_LINEAR!r}). Known: {sorted(KV_TARGETS)}"
        )
    return list(KV_TARGETS[model_type])


def _encoder_linear_names(model: TaskHeadClassifier) -> list[str]:
    return sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.encoder.named_modules() if isinstance(mod, nn.Linear)}
    )


def resolve_targets(model: nn.Module, targets: list[str] | str | None) -> list[str] | str:
    if targets is None:
        return default_lora_targets(model)
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            # Per-task heads are trained directly, never adapted.
            return _encoder_linear_names(model) if isinstance(model, TaskHeadClassifier) else ALL_LINEAR
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA targets must be module names, {ALL_LINEAR!r} or None, got {targets!r}")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(
            f"LoRA targets {missing} match no module of {type(model).__name__} "
            f"({_model_type(model) if hasattr(model, 'config') else '?'})"
        )
    return list(targets)


def attach_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: list[str] | str | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter (only LoRA factors and per-task heads stay trainable)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=resolve_targets(model, targets), lora_dropout=dropout, bias="none"
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if isinstance(model, TaskHeadClassifier):
        for p in model.heads.parameters():
            p.requires_grad_(True)
    return peft_model


def lora_scaling(model: Any, adapter_name: str = "default") -> float:
    """The scale s = alpha / r of an attached adapter (as PEFT applies it)."""
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter_name in scaling:
            return float(scaling[adapter_name])
    raise ValueError(f"no LoRA adapter {adapter_name!r} in {type(model).__name__}")
