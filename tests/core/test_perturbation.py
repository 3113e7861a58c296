from __future__ import annotations

import pytest
import torch

from pm_ray.core.lora import base_weight, lora_layers, task_vector
from pm_ray.core.perturbation import PERTURBATION_MODES, Branch, Perturbation


def _first_step_with(perturbation: Perturbation, branch: Branch, rank: int = 0) -> int:
    return next(step for step in range(1000) if perturbation.draw(rank, step) == branch)


def _layer_outputs(model, x_by_key):
    layers = lora_layers(model)
    with torch.no_grad():
        return {key: layers[key](x) for key, x in x_by_key.items()}


def _dense_outputs(model, x_by_key, delta, scale):
    out = {}
    for key, x in x_by_key.items():
        layer = lora_layers(model)[key]
        weight = base_weight(model, key).detach() + scale * delta[key]
        bias = layer.get_base_layer().bias
        out[key] = x @ weight.T + (0 if bias is None else bias.detach())
    return out


def test_validation_errors_name_field_and_value():
    with pytest.raises(ValueError, match="mode 'taskvector'"):
        Perturbation(mode="taskvector")
    for eps in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=rf"epsilon must be a number in \[0, 1\), got {eps}"):
            Perturbation(epsilon=eps)
    with pytest.raises(ValueError, match="probs must sum to 1"):
        Perturbation(probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="non-negative"):
        Perturbation(probs=(1.5, -0.5, 0.0))
    with pytest.raises(ValueError, match="three"):
        Perturbation(probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        Perturbation().draw(0, -1)
    assert Perturbation(probs=[0.2, 0.3, 0.5]).probs == (0.2, 0.3, 0.5)
    assert PERTURBATION_MODES == ("none", "task_vector", "gaussian")


def test_scale_per_branch():
    p = Perturbation(epsilon=0.25)
    assert [p.scale(b) for b in Branch] == [1.0, 1.25, 0.75]


def test_draws_reproducible_and_differ_across_rank_and_seed():
    p = Perturbation()
    draws = [p.draw(0, step) for step in range(200)]
    assert draws == [Perturbation().draw(0, step) for step in range(200)]
    assert draws != [p.draw(1, step) for step in range(200)]
    assert draws != [Perturbation(seed=1).draw(0, step) for step in range(200)]
    assert all(Perturbation(mode="none").draw(0, s) == Branch.ZERO for s in range(200))


@pytest.mark.parametrize("probs", [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.2, 0.3), (0.0, 1.0, 0.0)])
def test_branch_frequencies_match_probs(probs):
    p = Perturbation(probs=probs, seed=3)
    n = 30_000
    counts = torch.zeros(3)
    for step in range(n):
        counts[int(p.draw(step % 4, step))] += 1
    freq = counts / n
    # 5 binomial standard deviations at n = 30k is at most 0.0145.
    torch.testing.assert_close(freq, torch.tensor(probs), rtol=0, atol=0.015)
    for branch, prob in enumerate(probs):
        if prob == 0:
            assert counts[branch] == 0


@pytest.mark.parametrize("branch", list(Branch))
def test_task_vector_branch_effective_weight_is_w_plus_s_delta(tiny_llama_lora, branch):
    p = Perturbation(epsilon=0.5, seed=0)
    step = _first_step_with(p, branch)
    delta = task_vector(tiny_llama_lora)
    torch.manual_seed(1)
    x_by_key = {key: torch.randn(3, 5, 32) for key in delta}
    original_scaling = {k: layer.scaling["default"] for k, layer in lora_layers(tiny_llama_lora).items()}
    with p.apply(tiny_llama_lora, rank=0, step=step) as drawn:
        assert drawn == branch
        got = _layer_outputs(tiny_llama_lora, x_by_key)
    expected = _dense_outputs(tiny_llama_lora, x_by_key, delta, p.scale(branch))
    for key in delta:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    # Outside the block every module is back to W + Δ, with the identical scaling value.
    assert {k: layer.scaling["default"] for k, layer in lora_layers(tiny_llama_lora).items()} == original_scaling
    after = _layer_outputs(tiny_llama_lora, x_by_key)
    unperturbed = _dense_outputs(tiny_llama_lora, x_by_key, delta, 1.0)
    for key in delta:
        torch.testing.assert_close(after[key], unperturbed[key], rtol=1e-5, atol=1e-5)
    changed = [not torch.allclose(got[key], after[key], atol=1e-4) for key in delta]
    assert all(changed) if branch != Branch.ZERO else not any(changed)


def test_one_forward_per_training_step(tiny_llama_lora, make_causal_lm_batch):
    calls = []
    tiny_llama_lora.register_forward_pre_hook(lambda module, args: calls.append(1))
    optimizer = torch.optim.SGD([p for p in tiny_llama_lora.parameters() if p.requires_grad], lr=1e-2)
    p = Perturbation()
    batch = make_causal_lm_batch()
    for step in range(6):
        calls.clear()
        with p.apply(tiny_llama_lora, rank=0, step=step):
            loss = tiny_llama_lora(**batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert len(calls) == 1


def test_scaling_restored_after_exception(tiny_llama_lora):
    p = Perturbation(epsilon=0.5)
    step = _first_step_with(p, Branch.PLUS)
    before = {k: layer.scaling["default"] for k, layer in lora_layers(tiny_llama_lora).items()}
    with pytest.raises(RuntimeError, match="boom"):
        with p.apply(tiny_llama_lora, rank=0, step=step):
            assert all(layer.scaling["default"] == before[k] * 1.5 for k, layer in lora_layers(tiny_llama_lora).items())
            raise RuntimeError("boom")
    assert {k: layer.scaling["default"] for k, layer in lora_layers(tiny_llama_lora).items()} == before


def test_unknown_adapter_raises(tiny_llama_lora):
    with pytest.raises(ValueError, match="'task_2' is on no LoRA layer"):
        with Perturbation().apply(tiny_llama_lora, rank=0, step=0, adapter_name="task_2"):
            pass


@pytest.mark.parametrize("branch", [Branch.PLUS, Branch.MINUS])
def test_gaussian_magnitude_and_exact_restore(tiny_llama_lora, branch):
    p = Perturbation(mode="gaussian", epsilon=0.4, seed=5)
    step = _first_step_with(p, branch)
    layers = lora_layers(tiny_llama_lora)
    delta = task_vector(tiny_llama_lora)
    saved_B = {k: layer.lora_B["default"].weight.detach().clone() for k, layer in layers.items()}
    with p.apply(tiny_llama_lora, rank=0, step=step) as drawn:
        assert drawn == branch
        perturbed = task_vector(tiny_llama_lora)
    noise_directions = {}
    for key in delta:
        shift = perturbed[key] - delta[key]
        # ‖s·N·A‖_F = ε ‖Δ‖_F, and the shift is not along Δ (a random direction).
        assert shift.norm().item() == pytest.approx(0.4 * delta[key].norm().item(), rel=1e-4)
        cosine = (shift * delta[key]).sum() / (shift.norm() * delta[key].norm())
        assert abs(cosine.item()) < 0.9
        noise_directions[key] = shift
    for key, layer in layers.items():
        assert torch.equal(layer.lora_B["default"].weight.detach(), saved_B[key])
    # Same (seed, rank, step) -> same noise; the other sign branch uses the opposite direction.
    with p.apply(tiny_llama_lora, rank=0, step=step):
        again = task_vector(tiny_llama_lora)
    for key in delta:
        torch.testing.assert_close(again[key] - delta[key], noise_directions[key])


def test_gaussian_zero_branch_and_none_mode_change_nothing(tiny_llama_lora):
    delta = task_vector(tiny_llama_lora)
    gaussian = Perturbation(mode="gaussian")
    with gaussian.apply(tiny_llama_lora, rank=0, step=_first_step_with(gaussian, Branch.ZERO)) as drawn:
        assert drawn == Branch.ZERO
        inside = task_vector(tiny_llama_lora)
    with Perturbation(mode="none").apply(tiny_llama_lora, rank=0, step=0) as drawn_none:
        assert drawn_none == Branch.ZERO
        inside_none = task_vector(tiny_llama_lora)
    for key in delta:
        assert torch.equal(inside[key], delta[key]) and torch.equal(inside_none[key], delta[key])


def test_gaussian_restores_after_exception(tiny_llama_lora):
    p = Perturbation(mode="gaussian")
    step = _first_step_with(p, Branch.MINUS)
    layers = lora_layers(tiny_llama_lora)
    saved_B = {k: layer.lora_B["default"].weight.detach().clone() for k, layer in layers.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with p.apply(tiny_llama_lora, rank=0, step=step):
            key = "model.layers.0.self_attn.k_proj"
            assert not torch.equal(layers[key].lora_B["default"].weight, saved_B[key])
            raise RuntimeError("boom")
    for key, layer in layers.items():
        assert torch.equal(layer.lora_B["default"].weight.detach(), saved_B[key])
