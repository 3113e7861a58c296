from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pm_ray.core.fisher import FisherShard, diagonal_fisher, per_example_loss
from pm_ray.core.lora import base_weight, lora_layers


def _split(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in batch.items()})
        start += size
    return out


def brute_force_fisher_sums(model, batch, kind):
    """Σ_n (∂ℓ_n/∂W)² by a separate forward/backward of every example (weights made trainable)."""
    keys = sorted(lora_layers(model))
    weights = [base_weight(model, key) for key in keys]
    sums = {key: torch.zeros(w.shape) for key, w in zip(keys, weights)}
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    try:
        for row in range(batch["labels"].shape[0]):
            inputs = {k: v[row : row + 1] for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            labels = batch["labels"][row : row + 1]
            if kind == "causal_lm":
                # HF's own token-mean cross entropy of one example, shifted by one.
                loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            else:
                loss = F.cross_entropy(logits, labels)
            for key, grad in zip(keys, torch.autograd.grad(loss, weights)):
                sums[key] += grad.square()
    finally:
        for w in weights:
            w.requires_grad_(False)
    return sums


def _assert_sums_close(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert expected[key].abs().max() > 0, key
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-9)


def test_per_example_loss_causal_lm_matches_hf_loss(tiny_llama_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch()
    with torch.no_grad():
        logits = tiny_llama_lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = per_example_loss(logits, batch["labels"], "causal_lm")
        for row in range(4):
            hf = tiny_llama_lora(
                input_ids=batch["input_ids"][row : row + 1],
                attention_mask=batch["attention_mask"][row : row + 1],
                labels=batch["labels"][row : row + 1],
            ).loss
            torch.testing.assert_close(losses[row], hf, rtol=1e-5, atol=1e-6)
    no_targets = torch.full_like(batch["labels"], -100)
    assert torch.equal(per_example_loss(logits, no_targets, "causal_lm"), torch.zeros(4))


def test_causal_lm_fisher_equals_per_example_autograd(tiny_llama_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch(n=5)
    shard = diagonal_fisher(tiny_llama_lora, [batch], kind="causal_lm")
    assert shard.count == 5
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in shard.sums.values())
    _assert_sums_close(shard.sums, brute_force_fisher_sums(tiny_llama_lora, batch, "causal_lm"))


def test_classification_fisher_equals_per_example_autograd(tiny_bert_lora, make_classification_batch):
    batch = make_classification_batch(n=6)
    shard = diagonal_fisher(tiny_bert_lora, _split(batch, [4, 2]), kind="classification")
    assert shard.count == 6
    expected_keys = {f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")}
    assert set(shard.sums) == expected_keys
    _assert_sums_close(shard.sums, brute_force_fisher_sums(tiny_bert_lora, batch, "classification"))


def test_fan_in_fan_out_fisher_in_base_weight_layout(tiny_gpt2_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch(n=3)
    shard = diagonal_fisher(tiny_gpt2_lora, [batch])
    for key, tensor in shard.sums.items():
        assert tensor.shape == base_weight(tiny_gpt2_lora, key).shape == (32, 96)
    _assert_sums_close(shard.sums, brute_force_fisher_sums(tiny_gpt2_lora, batch, "causal_lm"))


def test_shards_of_two_halves_merge_to_full(tiny_llama_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch(n=6, seed=2)
    first, second = _split(batch, [4, 2])
    full = diagonal_fisher(tiny_llama_lora, [batch])
    merged = FisherShard.reduce([diagonal_fisher(tiny_llama_lora, [first]), diagonal_fisher(tiny_llama_lora, [second])])
    assert merged.count == full.count == 6
    _assert_sums_close(merged.sums, full.sums)
    mean = merged.mean()
    for key in full.sums:
        torch.testing.assert_close(mean[key], full.sums[key] / 6)


def test_max_examples_cuts_the_stream(tiny_llama_lora, make_causal_lm_batch):
    batches = [make_causal_lm_batch(seed=s, n=4) for s in range(3)]
    consumed = []

    def stream():
        for b in batches:
            consumed.append(1)
            yield b

    shard = diagonal_fisher(tiny_llama_lora, stream(), max_examples=6)
    assert shard.count == 6
    assert len(consumed) == 2  # the third batch is never pulled
    expected = diagonal_fisher(tiny_llama_lora, [batches[0], _split(batches[1], [2])[0]])
    _assert_sums_close(shard.sums, expected.sums)


def test_modes_and_grads_left_as_they_were(tiny_llama_lora, make_causal_lm_batch):
    tiny_llama_lora.train()
    lora_param = lora_layers(tiny_llama_lora)["model.layers.0.self_attn.k_proj"].lora_B["default"].weight
    assert lora_param.grad is None
    diagonal_fisher(tiny_llama_lora, [make_causal_lm_batch()])
    assert all(module.training for module in tiny_llama_lora.modules())
    assert all(p.grad is None for p in tiny_llama_lora.parameters())
    assert not any(p.requires_grad for key in lora_layers(tiny_llama_lora) for p in [base_weight(tiny_llama_lora, key)])
    # No hook is left behind: a forward afterwards does not grow any capture.
    assert all(not layer._forward_hooks for layer in lora_layers(tiny_llama_lora).values())


def test_frozen_adapter_still_gives_the_fisher(tiny_llama_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch()
    expected = diagonal_fisher(tiny_llama_lora, [batch]).sums
    for p in tiny_llama_lora.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # a caller in no_grad must not matter either
        frozen = diagonal_fisher(tiny_llama_lora, [batch]).sums
    _assert_sums_close(frozen, expected)


def test_bad_input_raises(tiny_llama_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch()
    with pytest.raises(ValueError, match="loss kind 'regression'"):
        diagonal_fisher(tiny_llama_lora, [batch], kind="regression")
    with pytest.raises(ValueError, match="loss kind 'seq2seq'"):
        per_example_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "seq2seq")
    with pytest.raises(ValueError, match="max_examples must be None or a positive int, got 0"):
        diagonal_fisher(tiny_llama_lora, [batch], max_examples=0)
    with pytest.raises(ValueError, match="expected a 'labels' entry"):
        diagonal_fisher(tiny_llama_lora, [{"input_ids": batch["input_ids"]}])
    with pytest.raises(ValueError, match=r"classification: expected logits \(N, C\)"):
        per_example_loss(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), "classification")
    assert all(not layer._forward_hooks for layer in lora_layers(tiny_llama_lora).values())


def test_shard_validation():
    a = FisherShard({"m": torch.ones(2, 2)}, 2)
    with pytest.raises(ValueError, match="count is 0"):
        FisherShard({"m": torch.zeros(2, 2)}, 0).mean()
    with pytest.raises(ValueError, match="missing modules \\['m'\\]"):
        a.merge(FisherShard({"other": torch.ones(2, 2)}, 1))
    with pytest.raises(ValueError, match="shape"):
        a.merge(FisherShard({"m": torch.ones(3, 2)}, 1))
    with pytest.raises(ValueError, match="no shards"):
        FisherShard.reduce([])
    with pytest.raises(ValueError, match="count must be a non-negative int, got -1"):
        FisherShard({}, -1)
    merged = FisherShard.reduce([a, FisherShard({"m": torch.full((2, 2), 3.0)}, 2)])
    assert merged.count == 4 and torch.equal(merged.mean()["m"], torch.ones(2, 2))


def test_per_example_products_stay_fp32_under_bf16_autocast():
    """trainer.precision=bf16-mixed runs the Fisher forward under autocast; the g_nᵀ x_n products and
    their squares must not be autocast to bf16 as well (bmm is on autocast's bf16 list)."""
    from pm_ray.core.fisher import _squared_per_example_grads

    gen = torch.Generator().manual_seed(0)
    calls = [(torch.randn(3, 5, 16, generator=gen), torch.randn(3, 5, 12, generator=gen))]
    reference = _squared_per_example_grads(calls, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _squared_per_example_grads(calls, 3)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, reference, rtol=1e-6, atol=0.0)


def test_fisher_under_bf16_autocast_is_close_to_fp32(tiny_llama_lora, make_causal_lm_batch):
    """The bf16 forward changes x and g by bf16 rounding (~0.4% each): the Fisher stays within a few %."""
    batch = make_causal_lm_batch(n=4)
    expected = brute_force_fisher_sums(tiny_llama_lora, batch, "causal_lm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shard = diagonal_fisher(tiny_llama_lora, [batch], kind="causal_lm")
    for key, tensor in shard.sums.items():
        assert tensor.dtype == torch.float32
        rel = (tensor - expected[key]).norm() / expected[key].norm()
        assert rel < 0.05, (key, float(rel))


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_mean_of_is_reduce_then_mean_bit_for_bit_and_writes_into_out(num_shards: int) -> None:
    gen = torch.Generator().manual_seed(num_shards)
    shapes = {"a": (5, 7), "b": (3,)}
    shards = [
        FisherShard({k: torch.rand(s, generator=gen) for k, s in shapes.items()}, count=3 + i)
        for i in range(num_shards)
    ]
    expected = FisherShard.reduce(shards).mean()
    out = {"a": torch.full((5, 7), -1.0), "b": torch.full((4,), -1.0)}  # b: another shape, not used
    got = FisherShard.mean_of(shards, out=out)
    assert all(torch.equal(got[k], expected[k]) for k in shapes)
    assert got["a"] is out["a"] and got["b"] is not out["b"]
    # a shard's own tensor is never written into, even when offered as out
    again = FisherShard.mean_of(shards, out={"a": shards[0].sums["a"]})
    assert again["a"] is not shards[0].sums["a"] and torch.equal(again["a"], expected["a"])
    with pytest.raises(ValueError, match="count is 0"):
        FisherShard.mean_of([FisherShard({"a": torch.zeros(2)}, count=0)])
