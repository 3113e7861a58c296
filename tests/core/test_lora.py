from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pm_ray.core.lora import (
    LoraFactors,
    base_weight,
    fold_adapters,
    fold_delta,
    lora_factors,
    lora_layers,
    normalize_module_name,
    task_vector,
)

KEYS_LLAMA = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")}


def _merged_weights(peft_model, keys):
    merged = peft_model.merge_and_unload()
    return {key: merged.get_submodule(key).weight.detach().clone() for key in keys}


def test_normalize_module_name():
    key = "model.layers.0.self_attn.k_proj"
    assert normalize_module_name("base_model.model." + key) == key
    assert normalize_module_name("base_model.model.model.layers.0.self_attn.k_proj.base_layer") == (
        "model.layers.0.self_attn.k_proj"
    )
    assert normalize_module_name("model.layers.0.self_attn.k_proj") == "model.layers.0.self_attn.k_proj"


def test_lora_layers_keys_and_unknown_adapter(tiny_llama_lora):
    assert set(lora_layers(tiny_llama_lora)) == KEYS_LLAMA
    # The LoraModel and the inner HF model give the same keys as the PeftModel.
    assert set(lora_layers(tiny_llama_lora.base_model)) == KEYS_LLAMA
    assert set(lora_layers(tiny_llama_lora.base_model.model)) == KEYS_LLAMA
    with pytest.raises(ValueError, match="'task_7' is on no LoRA layer"):
        lora_layers(tiny_llama_lora, "task_7")


def test_task_vector_folded_equals_peft_merge(tiny_llama_lora, make_llama):
    delta = task_vector(tiny_llama_lora)
    assert set(delta) == KEYS_LLAMA
    for key, tensor in delta.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert tensor.abs().max() > 0
        assert tensor.shape == base_weight(tiny_llama_lora, key).shape

    reference = make_llama()  # same seed: same base and LoRA weights
    expected = _merged_weights(reference, KEYS_LLAMA)
    fold_delta(tiny_llama_lora, delta)
    for key in KEYS_LLAMA:
        torch.testing.assert_close(base_weight(tiny_llama_lora, key).detach(), expected[key], rtol=1e-6, atol=1e-6)


def test_task_vector_fan_in_fan_out_equals_peft_merge(tiny_gpt2_lora, make_gpt2):
    keys = {f"transformer.h.{i}.attn.c_attn" for i in range(2)}
    factors = lora_factors(tiny_gpt2_lora)
    assert set(factors) == keys and all(f.fan_in_fan_out for f in factors.values())
    delta = task_vector(tiny_gpt2_lora)
    for key in keys:
        assert delta[key].shape == (32, 96) == base_weight(tiny_gpt2_lora, key).shape  # Conv1D: d_in x d_out
    expected = _merged_weights(make_gpt2(), keys)
    fold_delta(tiny_gpt2_lora, delta)
    for key in keys:
        torch.testing.assert_close(base_weight(tiny_gpt2_lora, key).detach(), expected[key], rtol=1e-6, atol=1e-6)


def test_factors_delta_matches_peft_delta_weight(tiny_llama_lora):
    layer = lora_layers(tiny_llama_lora)["model.layers.0.self_attn.k_proj"]
    factors = lora_factors(tiny_llama_lora)["model.layers.0.self_attn.k_proj"]
    torch.testing.assert_close(factors.delta(), layer.get_delta_weight("default").detach())
    assert factors.scaling == pytest.approx(8 / 4)


def test_fold_delta_on_plain_model_with_per_module_alpha(tiny_llama_lora):
    plain = tiny_llama_lora.base_model.model  # the HF model, LoRA layers still injected
    delta = task_vector(tiny_llama_lora)
    alpha = {key: 0.25 * (i + 1) for i, key in enumerate(sorted(delta))}
    before = {key: base_weight(plain, key).detach().clone() for key in delta}
    fold_delta(plain, delta, alpha)
    for key in delta:
        torch.testing.assert_close(base_weight(plain, key).detach(), before[key] + alpha[key] * delta[key])


def test_fold_adapters_stack_equals_dense_sum(make_llama):
    target = make_llama(seed=0)
    stack_models = [make_llama(seed=s) for s in (1, 2, 3)]
    factors = [lora_factors(m) for m in stack_models]
    keys = sorted(KEYS_LLAMA)
    alphas: list[float | dict[str, float]] = [1.0, 0.3, {key: -0.5 + 0.1 * i for i, key in enumerate(keys)}]
    before = {key: base_weight(target, key).detach().clone() for key in keys}

    fold_adapters(target, list(zip(alphas, factors)))

    for key in keys:
        expected = before[key].clone()
        for alpha, fac in zip(alphas, factors):
            a = alpha[key] if isinstance(alpha, dict) else alpha
            expected += a * fac[key].scaling * fac[key].B @ fac[key].A
        torch.testing.assert_close(base_weight(target, key).detach(), expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(base_weight(target, key).detach(), before[key])


def test_fold_into_bfloat16_rounds_once(tiny_llama_lora):
    delta = task_vector(tiny_llama_lora)
    model = tiny_llama_lora.to(torch.bfloat16)
    key = "model.layers.1.self_attn.v_proj"
    before = base_weight(model, key).detach().clone()
    fold_delta(model, {key: delta[key]}, 0.5)
    weight = base_weight(model, key)
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.detach(), (before.float() + 0.5 * delta[key]).to(torch.bfloat16), rtol=0, atol=0)


def test_fold_rejects_bad_keys_shapes_alpha_and_leaves_weights(tiny_llama_lora):
    delta = task_vector(tiny_llama_lora)
    before = {key: base_weight(tiny_llama_lora, key).detach().clone() for key in delta}
    bad_key = dict(delta, **{"model.layers.9.self_attn.k_proj": delta["model.layers.0.self_attn.k_proj"]})
    with pytest.raises(ValueError, match="model.layers.9.self_attn.k_proj"):
        fold_delta(tiny_llama_lora, bad_key)
    bad_shape = dict(delta, **{"model.layers.1.self_attn.k_proj": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"delta\['model.layers.1.self_attn.k_proj'\] has shape \(3, 3\)"):
        fold_delta(tiny_llama_lora, bad_shape)
    with pytest.raises(ValueError, match="missing modules"):
        fold_delta(tiny_llama_lora, delta, {"model.layers.0.self_attn.k_proj": 1.0})
    with pytest.raises(ValueError, match="NaN"):
        nan = torch.full_like(delta["model.layers.0.self_attn.v_proj"], float("nan"))
        fold_delta(tiny_llama_lora, dict(delta, **{"model.layers.0.self_attn.v_proj": nan}))
    with pytest.raises(ValueError, match="no dense weight"):
        base_weight(tiny_llama_lora, "model.layers.0.self_attn")
    fac = lora_factors(tiny_llama_lora)
    wrong = LoraFactors(A=torch.zeros(4, 7), B=torch.zeros(16, 4), scaling=1.0)
    with pytest.raises(ValueError, match=r"stack\[1\]\['model.layers.0.self_attn.k_proj'\].*\(16, 7\)"):
        fold_adapters(tiny_llama_lora, [(1.0, fac), (1.0, {"model.layers.0.self_attn.k_proj": wrong})])
    with pytest.raises(ValueError, match="same r"):
        LoraFactors(A=torch.zeros(4, 7), B=torch.zeros(16, 3), scaling=1.0)
    for key in delta:  # nothing was written by any failed call
        assert torch.equal(base_weight(tiny_llama_lora, key).detach(), before[key])


def test_dora_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["k_proj"], use_dora=True))
    with pytest.raises(ValueError, match="variant"):
        task_vector(model)
