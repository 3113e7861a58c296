"""A backbone's module tree without its weights (built on the meta device), for load-time checks.

``pm-ray run`` checks ``lora.targets`` against the module names before anything is written: the
same check the workers make in :func:`pm_ray.models.lora.resolve_targets`, on a model whose
parameters have no storage (tiny models from their config, local and bundled models from their
config.json or GGUF header).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from pm_ray.models.backbone import bundled_model_dir, tiny_llama_config
from pm_ray.models.tiny_tokenizer import tiny_llama_tokenizer


def causal_lm_skeleton(name_or_path: str) -> nn.Module | None:
    """The causal LM's modules on the meta device; None where that needs the hub (a hub id)."""
    ref = str(name_or_path).strip()
    if ref == "tiny:llama":
        tok = tiny_llama_tokenizer()
        config = tiny_llama_config(len(tok), tok)
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    if ref.startswith("bundled:"):
        model_dir, entry = bundled_model_dir(ref[len("bundled:") :])
        extra = {"gguf_file": entry.gguf_file} if entry.gguf_file else {}
        config = AutoConfig.from_pretrained(str(model_dir), **extra)
    elif (Path(ref).expanduser() / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(Path(ref).expanduser()))
    else:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
