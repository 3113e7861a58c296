"""A model as a plain Hugging Face checkpoint: dense safetensors weights, config.json without
quantizer state, and the tokenizer (with its chat template). Used by `pm-ray export` and by the
one-time conversion of a bundled GGUF model (models/backbone.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plain_model(model: Any) -> Any:
    """The model without quantizer state when its weights are all dense floating point tensors
    (transformers keeps a GGUF "quantizer" on a model it dequantised, and then refuses
    save_pretrained); a model that really holds packed weights is refused."""
    packed = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_floating_point()]
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None and getattr(model.config, "quantization_config", None) is None:
        return model
    if packed:
        raise ValueError(
            f"the model holds quantized (packed) tensors, e.g. {packed[:3]}; a dense export needs dequantized weights"
        )
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # hf_quantizer, config.quantization_config, is_quantized
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config._is_quantized = False
    model.is_quantized = False
    return model


def save_dense(model: Any, tokenizer: Any, target: Path) -> None:
    """A plain HF checkpoint: safetensors, config.json without quantization, tokenizer."""
    plain_model(model).save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    config = json.loads((target / "config.json").read_text())
    leftover = [k for k in config if "quantiz" in k or "gguf" in k]
    if leftover:
        raise ValueError(f"{target / 'config.json'}: still has {leftover} after clearing the quantizer")
