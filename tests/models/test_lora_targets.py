from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora, default_lora_targets, lora_scaling


def _lora_param_count(model: nn.Module, names: set[str], rank: int) -> int:
    """Brute force: r * (in + out) for every Linear whose last name component is targeted."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in names:
            total += rank * (mod.in_features + mod.out_features)
    return total


def test_default_targets_per_architecture():
    llama, _ = load_backbone("tiny:llama")
    bert, _ = load_backbone("tiny:bert", kind="classification")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert default_lora_targets(llama) == ["k_proj", "v_proj"]
    assert default_lora_targets(bert) == ["key", "value"]
    assert default_lora_targets(gpt2) == ["c_attn"]


def test_attach_default_kv_lora_trains_only_lora_and_starts_as_identity():
    model, tok = load_backbone("tiny:llama")
    ids = tok("same output", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    expected = _lora_param_count(model, {"k_proj", "v_proj"}, rank=4)
    peft_model = attach_lora(model, rank=4, alpha=8, targets=None)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert lora_scaling(peft_model) == 2.0
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, before)  # B = 0 at init


def test_all_linear_targets_every_linear_but_the_output_layer():
    model, _ = load_backbone("tiny:llama")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    expected = _lora_param_count(model, names, rank=2)
    peft_model = attach_lora(model, rank=2, alpha=2, targets="all-linear")
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected


def test_classifier_heads_stay_trainable_and_unadapted():
    model, _ = load_backbone("tiny:bert", kind="classification")
    model.add_task("t", ["a", "b", "c"])
    peft_model = attach_lora(model, rank=2, alpha=4, targets="all-linear")
    head_params = [n for n, p in peft_model.named_parameters() if p.requires_grad and "heads" in n]
    assert head_params and all("lora_" not in n for n in head_params)


def test_bad_targets_and_hyperparameters():
    model, _ = load_backbone("tiny:llama")
    with pytest.raises(ValueError, match=r"LoRA targets \['query'\] match no module"):
        attach_lora(model, rank=2, alpha=2, targets=["query"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        attach_lora(model, rank=0, alpha=2)
    with pytest.raises(ValueError, match="no default LoRA targets for model_type"):

        class Odd(nn.Module):
            config = type("C", (), {"model_type": "mystery"})()

        default_lora_targets(Odd())
