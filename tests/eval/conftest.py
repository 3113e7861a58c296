from __future__ import annotations

import pytest
import torch

from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora


def make_lora_tiny(attn: str = "sdpa"):
    """A fresh tiny:llama with a LoRA adapter whose B is non-zero (so the adapter changes scores)."""
    model, tok = load_backbone("tiny:llama")
    model.set_attn_implementation(attn)
    model = attach_lora(model, rank=4, alpha=8)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny_llama():
    return load_backbone("tiny:llama")


@pytest.fixture(scope="module")
def lora_model():
    """One LoRA tiny:llama per test module, for tests that only read it."""
    return make_lora_tiny()


@pytest.fixture
def lora_tiny():
    """The factory, for tests that change the model or need eager attention."""
    return make_lora_tiny
