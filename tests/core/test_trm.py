"""TRM (a reconstruction from the paper's abstract): the subspace, the three objectives, the optimiser
over c on a tiny Llama whose LoRA_t was really trained from θ̂_{t-1}, and the `trm` merge strategy."""

from __future__ import annotations

import copy
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pm_ray.core.coefficient import optimal_alpha
from pm_ray.core.lora import base_weight, fold_delta, lora_layers, task_vector
from pm_ray.core.strategies import TaskUpdate, build_strategy
from pm_ray.core.trm import (
    TRMSettings,
    combine,
    expert_coefficient,
    gradient_responsiveness,
    initial_coefficients,
    layer_groups,
    merged_logits,
    optimize_coefficients,
    prediction_consistency,
    snapshot_steps,
    task_alignment,
    trajectory_directions,
    weight_names,
)

K = 3


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and the CI cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_trajectory(make_llama, make_causal_lm_batch, seed: int = 0, total_steps: int = 12):
    """A worker's view after task t: the backbone holds θ̂_{t-1} = W0 + δ̂_{t-1} folded in, LoRA_t
    (B = 0 at the start, as PEFT initialises it) trained on the task batch with K snapshots."""
    model = make_llama(seed)
    keys = list(lora_layers(model))
    w0 = {key: base_weight(model, key).detach().clone() for key in keys}
    gen = torch.Generator().manual_seed(seed + 100)
    merged_prev = {key: 0.05 * torch.randn(w.shape, generator=gen) for key, w in w0.items()}
    fold_delta(model, merged_prev)
    for layer in lora_layers(model).values():
        torch.nn.init.zeros_(layer.lora_B["default"].weight)
    batch = make_causal_lm_batch(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    snapshots, record_at = [], snapshot_steps(total_steps, K)
    for step in range(1, total_steps + 1):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        if step in record_at:
            snapshots.append(task_vector(model))
    optimizer.zero_grad(set_to_none=True)  # the training leaves no .grad behind
    return model, w0, trajectory_directions(merged_prev, snapshots), batch


def rms_norm_in_input_dtype(self: LlamaRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    # HF's LlamaRMSNorm rounds to float32; the finite-difference check needs float64 throughout
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_llama(model):
    """The model in float64 end to end: SDPA attention (eager softmaxes in float32) and RMSNorm
    without its float32 round trip; only the constant rotary table stays float32-computed."""
    model = model.double()
    model.get_base_model().set_attn_implementation("sdpa")
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(rms_norm_in_input_dtype, module)
    return model


def objectives_at(model, w0, directions, c, batch, groups=None):
    """(L_align, KL to θ̂_{t-1}, KL to the expert θ*_t, L_resp) of θ(c), without gradients."""
    names = weight_names(model, list(w0))
    with torch.no_grad():
        logits = merged_logits(model, names, w0, directions, c, groups, batch)
        prev_c, expert_c = torch.zeros(K + 1, dtype=c.dtype), torch.zeros(K + 1, dtype=c.dtype)
        prev_c[0] = expert_c[0] = expert_c[K] = 1.0
        prev = merged_logits(model, names, w0, directions, prev_c, None, batch)
        expert = merged_logits(model, names, w0, directions, expert_c, None, batch)
        return (
            float(task_alignment(logits, batch)),
            float(prediction_consistency(logits, prev, batch["labels"])),
            float(prediction_consistency(logits, expert, batch["labels"])),
            float(gradient_responsiveness(logits, batch["labels"])),
        )


def test_snapshot_steps_groups_and_initial_coefficients() -> None:
    assert snapshot_steps(12, 4) == [3, 6, 9, 12]
    assert snapshot_steps(10, 3) == [3, 6, 10]
    assert snapshot_steps(5, 1) == [5]
    with pytest.raises(ValueError, match="total_steps=2 is fewer than k=3"):
        snapshot_steps(2, 3)
    keys = [
        "model.layers.10.self_attn.v_proj",
        "model.layers.2.self_attn.k_proj",
        "lm_head",
        "model.layers.2.mlp.up_proj",
    ]
    assert layer_groups(keys) == {
        "model.layers.2.self_attn.k_proj": 0,
        "model.layers.2.mlp.up_proj": 0,
        "model.layers.10.self_attn.v_proj": 1,
        "lm_head": 2,
    }
    assert torch.equal(initial_coefficients(3, 0.4), torch.tensor([1.0, 0.0, 0.0, 0.4]))
    groups = {"model.layers.0.k": 0, "model.layers.0.v": 0, "model.layers.1.k": 1}
    c = initial_coefficients(2, {"model.layers.0.k": 0.2, "model.layers.0.v": 0.6, "model.layers.1.k": 0.9}, groups)
    assert torch.allclose(c, torch.tensor([[1.0, 0.0, 0.4], [1.0, 0.0, 0.9]]))


def test_merge_stays_in_the_trajectory_subspace(make_llama, make_causal_lm_batch) -> None:
    model, w0, directions, batch = trained_trajectory(make_llama, make_causal_lm_batch)
    settings = TRMSettings(snapshots=K, steps=4, per_group=True)
    groups = layer_groups(list(w0))
    with model.disable_adapter():
        c, _ = optimize_coefficients(model, directions, w0, [batch], initial_coefficients(K, 0.5, groups), settings)
        assert c.shape == (2, K + 1) and not torch.equal(c, initial_coefficients(K, 0.5, groups))
        names = weight_names(model, list(w0))
        logits = merged_logits(model, names, w0, directions, c, groups, batch)
        # c = (1, 0.., 1) is the expert θ*_t: below it must equal the trained LoRA on top of θ̂_{t-1}
        expert_c = torch.tensor([1.0] + [0.0] * (K - 1) + [1.0])
        with torch.no_grad():
            expert_logits = merged_logits(model, names, w0, directions, expert_c, None, batch)
    # independent dense reconstruction: layer index read off the name, one term at a time
    reference = {}
    for key in w0:
        layer = int(key.split(".")[2])
        reference[key] = torch.zeros_like(w0[key])
        for j, direction in enumerate(directions):
            reference[key] += float(c[layer, j]) * direction[key]
    merged = combine(directions, c, groups)
    for key in w0:
        assert torch.allclose(merged[key], reference[key], atol=1e-6)
    plain = copy.deepcopy(model.get_base_model())
    for module in lora_layers(plain).values():
        module.enable_adapters(False)  # the LoRA branch must not add itself to the check
    with torch.no_grad():
        for key in w0:
            base_weight(plain, key).copy_(w0[key] + reference[key])
        assert torch.allclose(plain(**{k: v for k, v in batch.items() if k != "labels"}).logits, logits, atol=1e-5)
        assert torch.allclose(expert_logits, model(**batch).logits, atol=1e-5)


def test_weights_untouched_and_no_grads(make_llama, make_causal_lm_batch) -> None:
    model, w0, directions, batch = trained_trajectory(make_llama, make_causal_lm_batch, seed=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with model.disable_adapter():
        optimize_coefficients(
            model, directions, w0, [batch], initial_coefficients(K, 0.5), TRMSettings(snapshots=K, steps=3)
        )
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name
    with pytest.raises(ValueError, match="active or merged LoRA adapter"):
        optimize_coefficients(model, directions, w0, [batch], initial_coefficients(K, 0.5), TRMSettings(snapshots=K))


def test_consistency_alone_returns_to_the_previous_model(make_llama, make_causal_lm_batch) -> None:
    model, w0, directions, batch = trained_trajectory(make_llama, make_causal_lm_batch, seed=2)
    settings = TRMSettings(snapshots=K, steps=60, align_weight=0.0, consistency_weight=1.0, responsiveness_weight=0.0)
    c_init = initial_coefficients(K, 0.8)
    with model.disable_adapter():
        c, log = optimize_coefficients(model, directions, w0, [batch], c_init, settings)
        _, kl_prev_start, _, _ = objectives_at(model, w0, directions, c_init, batch)
        _, kl_prev_end, _, _ = objectives_at(model, w0, directions, c, batch)
    assert log[0]["prediction_consistency"] == pytest.approx(kl_prev_start, rel=1e-5)
    assert kl_prev_start > 1e-3
    assert kl_prev_end < 0.05 * kl_prev_start


def test_alignment_alone_moves_towards_the_expert(make_llama, make_causal_lm_batch) -> None:
    model, w0, directions, batch = trained_trajectory(make_llama, make_causal_lm_batch, seed=3)
    settings = TRMSettings(snapshots=K, steps=20, align_weight=1.0, consistency_weight=0.0, responsiveness_weight=0.0)
    c_init = initial_coefficients(K, 0.2)
    with model.disable_adapter():
        c, log = optimize_coefficients(model, directions, w0, [batch], c_init, settings)
        loss_start, _, kl_expert_start, _ = objectives_at(model, w0, directions, c_init, batch)
        loss_end, _, kl_expert_end, _ = objectives_at(model, w0, directions, c, batch)
        loss_expert, *_ = objectives_at(model, w0, directions, initial_coefficients(K, 1.0), batch)
    assert log[0]["task_alignment"] == pytest.approx(loss_start, rel=1e-5)
    assert loss_expert < loss_start  # LoRA_t was trained on this batch
    assert loss_start - loss_end > 0.5 * (loss_start - loss_expert)
    assert kl_expert_end < 0.5 * kl_expert_start


def test_responsiveness_alone_flattens_the_outputs(make_llama, make_causal_lm_batch) -> None:
    model, w0, directions, batch = trained_trajectory(make_llama, make_causal_lm_batch, seed=4)
    settings = TRMSettings(snapshots=K, steps=20, align_weight=0.0, consistency_weight=0.0, responsiveness_weight=1.0)
    with model.disable_adapter():
        c, _ = optimize_coefficients(model, directions, w0, [batch], initial_coefficients(K, 1.0), settings)
        *_, collision_start = objectives_at(model, w0, directions, initial_coefficients(K, 1.0), batch)
        *_, collision_end = objectives_at(model, w0, directions, c, batch)
    assert 1.0 / 128 <= collision_end < collision_start


@pytest.mark.parametrize("per_group", [False, True])
def test_objective_gradients_match_central_differences(make_llama, make_causal_lm_batch, per_group: bool) -> None:
    model, w0, directions, batch = trained_trajectory(make_llama, make_causal_lm_batch, seed=5, total_steps=6)
    model = float64_llama(model)
    w0 = {key: t.double() for key, t in w0.items()}
    directions = [{key: t.double() for key, t in d.items()} for d in directions]
    groups = layer_groups(list(w0)) if per_group else None
    c0 = initial_coefficients(K, 0.6, groups).double()
    c0 = c0 + 0.1 * torch.randn(c0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with model.disable_adapter():
        names = weight_names(model, list(w0))
        prev_c = torch.zeros(K + 1, dtype=torch.float64)
        prev_c[0] = 1.0
        with torch.no_grad():
            logits_prev = merged_logits(model, names, w0, directions, prev_c, None, batch)
        objectives = {
            "align": lambda logits: task_alignment(logits, batch),
            "consistency": lambda logits: prediction_consistency(logits, logits_prev, batch["labels"]),
            "responsiveness": lambda logits: gradient_responsiveness(logits, batch["labels"]),
        }
        for name, objective in objectives.items():
            c = c0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(merged_logits(model, names, w0, directions, c, groups, batch)), [c])
            h, numeric = 1e-5, torch.zeros_like(c0)
            with torch.no_grad():
                for index in range(c0.numel()):
                    step = torch.zeros(c0.numel(), dtype=torch.float64)
                    step[index] = h
                    step = step.view(c0.shape)
                    up = objective(merged_logits(model, names, w0, directions, c0 + step, groups, batch))
                    down = objective(merged_logits(model, names, w0, directions, c0 - step, groups, batch))
                    numeric.view(-1)[index] = (up - down) / (2 * h)
            assert grad.abs().max() > 1e-6, name  # a zero gradient would pass any comparison
            assert (grad - numeric).abs().max() <= 1e-6 * grad.abs().max(), (name, grad, numeric)


def shared_list_all_reduce(world_size: int):
    """all_reduce(SUM) for threads: each rank writes its slot, waits, and all read the same sum."""
    slots: list[torch.Tensor | None] = [None] * world_size
    barrier = threading.Barrier(world_size, timeout=60)

    def for_rank(rank: int):
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots)  # type: ignore[arg-type]
            barrier.wait()  # no rank overwrites its slot before every rank has read the sum
            return total

        return all_reduce

    return for_rank


def test_gradients_averaged_across_workers_equal_the_full_batch(make_llama, make_causal_lm_batch) -> None:
    model, w0, directions, batch = trained_trajectory(make_llama, make_causal_lm_batch, seed=6)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    settings = TRMSettings(snapshots=K, steps=5, lr=0.05)
    c_init = initial_coefficients(K, 0.5)
    plain = copy.deepcopy(model.get_base_model())
    for module in lora_layers(plain).values():
        module.enable_adapters(False)  # the backbone alone, as in the model given to each worker
    full_c, full_log = optimize_coefficients(plain, directions, w0, [batch], c_init, settings)
    reduce_for = shared_list_all_reduce(2)
    workers = [copy.deepcopy(plain) for _ in range(2)]  # functional_call swaps weights: one model a thread
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                optimize_coefficients,
                workers[r],
                directions,
                w0,
                [halves[r]],
                c_init,
                settings,
                grad_all_reduce=reduce_for(r),
                world_size=2,
            )
            for r in range(2)
        ]
        (c_a, log_a), (c_b, _) = [f.result() for f in futures]
    assert torch.equal(c_a, c_b)
    assert torch.allclose(c_a, full_c, atol=1e-5)
    assert not torch.allclose(c_a, c_init, atol=1e-3)
    # a single worker on its half alone follows another path: the reduce matters
    alone, _ = optimize_coefficients(copy.deepcopy(plain), directions, w0, [halves[0]], c_init, settings)
    assert not torch.allclose(alone, full_c, atol=1e-4)
    assert log_a[0]["task_alignment"] != pytest.approx(full_log[0]["task_alignment"])
    with pytest.raises(ValueError, match="world_size=2 needs"):
        optimize_coefficients(plain, directions, w0, [batch], c_init, settings, world_size=2)


# ---- the strategy --------------------------------------------------------------------------------
KEYS = {"model.layers.0.self_attn.k_proj": (2, 3), "model.layers.1.self_attn.k_proj": (3, 2)}


def stream(seed: int = 0, tasks: int = 4):
    gen = torch.Generator().manual_seed(seed)
    deltas = [{k: torch.randn(s, generator=gen) for k, s in KEYS.items()} for _ in range(tasks)]
    fishers = [{k: torch.rand(s, generator=gen) for k, s in KEYS.items()} for _ in range(tasks)]
    optimised = [{k: torch.randn(s, generator=gen) for k, s in KEYS.items()} for _ in range(tasks)]
    return deltas, fishers, optimised


def test_strategy_without_extras_is_pm() -> None:
    deltas, fishers, _ = stream(2)
    trm, pm, alphas = build_strategy("trm"), build_strategy("pm"), []
    for t, (d, f) in enumerate(zip(deltas, fishers), start=1):
        assert trm.coefficient(TaskUpdate(t, d, f)) == pm.coefficient(TaskUpdate(t, d, f))
        ours, theirs = trm.merge(TaskUpdate(t, d, f)), pm.merge(TaskUpdate(t, d, f))
        assert ours.alpha == theirs.alpha
        assert all(torch.equal(ours.merged[k], theirs.merged[k]) for k in KEYS)
        alphas.append(ours.alpha)
    assert alphas[0] == 1.0 and all(0.0 < a < 1.0 for a in alphas[1:])  # the stream exercises the solve


def test_strategy_uses_the_optimised_merge_and_absorbs_the_expert() -> None:
    deltas, fishers, optimised = stream(2)
    trm = build_strategy("trm")
    first = trm.merge(
        TaskUpdate(1, deltas[0], fishers[0], {"merged": optimised[0], "coefficients": torch.tensor([1.0, 0.2, 0.7])})
    )
    assert first.alpha == pytest.approx(0.7)
    assert all(
        torch.equal(first.merged[k], optimised[0][k]) and torch.equal(first.start_next[k], optimised[0][k])
        for k in KEYS
    )
    # task 2 falls back to P&M from θ̂_1 = the optimised merge; task 1's expert is θ̂_0 + Δ_1 = Δ_1
    second = trm.merge(TaskUpdate(2, deltas[1], fishers[1]))
    experts = [deltas[0], {k: optimised[0][k] + deltas[1][k] for k in KEYS}]
    assert second.alpha == pytest.approx(optimal_alpha(deltas[1], optimised[0], experts, fishers[:2]), abs=1e-6)
    per_group = torch.tensor([[1.0, 0.1, 0.3], [0.9, 0.0, 0.6]])
    third = trm.merge(TaskUpdate(3, deltas[2], fishers[2], {"merged": optimised[2], "coefficients": per_group}))
    assert third.alpha == pytest.approx(
        {"model.layers.0.self_attn.k_proj": 0.3, "model.layers.1.self_attn.k_proj": 0.6}
    )
    assert build_strategy("trm").merge(TaskUpdate(1, deltas[0], fishers[0], {"merged": optimised[0]})).alpha is None
    # a sharded merge sends the per-module c_K itself (expert_coefficient), for its modules only
    shard = {"model.layers.1.self_attn.k_proj": deltas[0]["model.layers.1.self_attn.k_proj"]}
    sent = expert_coefficient(per_group, layer_groups(list(KEYS)))
    alone = build_strategy("trm").merge(
        TaskUpdate(
            1,
            shard,
            {k: fishers[0][k] for k in shard},
            {"merged": {k: optimised[0][k] for k in shard}, "alpha": {k: sent[k] for k in shard}},
        )
    )
    assert alone.alpha == pytest.approx({"model.layers.1.self_attn.k_proj": 0.6})
    assert expert_coefficient(torch.tensor([1.0, 0.2, 0.7])) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="has shape \\(3, 3\\); expected \\(K\\+1,\\) or \\(2, K\\+1\\)"):
        build_strategy("trm").merge(
            TaskUpdate(1, deltas[0], fishers[0], {"merged": optimised[0], "coefficients": torch.ones(3, 3)})
        )
    with pytest.raises(ValueError, match="alpha override"):
        build_strategy("trm").merge(TaskUpdate(1, deltas[0], fishers[0], {"merged": optimised[0]}), alpha=0.5)
    bad = {"model.layers.0.self_attn.k_proj": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="missing modules"):
        build_strategy("trm").merge(TaskUpdate(1, deltas[0], fishers[0], {"merged": bad}))


def test_strategy_save_load_resumes_identically(tmp_path) -> None:
    deltas, fishers, optimised = stream(3)

    def update(t: int) -> TaskUpdate:  # odd tasks optimised by the workers, even ones fall back
        extras = {"merged": optimised[t - 1], "coefficients": torch.tensor([1.0, 0.1, 0.4])} if t % 2 else {}
        return TaskUpdate(t, deltas[t - 1], fishers[t - 1], extras)

    uninterrupted = build_strategy("trm", snapshots=2)
    results = [uninterrupted.merge(update(t)) for t in range(1, 5)]
    first = build_strategy("trm", snapshots=2)
    for t in (1, 2):
        first.merge(update(t))
    first.save(tmp_path / "trm.safetensors")
    resumed = build_strategy("trm", snapshots=2)
    resumed.load(tmp_path / "trm.safetensors")
    for t in (3, 4):
        r = resumed.merge(update(t))
        assert r.alpha == results[t - 1].alpha
        assert all(torch.equal(r.merged[k], results[t - 1].merged[k]) for k in KEYS)
    assert results[2].alpha == pytest.approx(0.4) and isinstance(results[3].alpha, float)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"snapshots": 0}, "snapshots=0 must be an int >= 1"),
        ({"steps": -1}, "steps=-1 must be an int >= 0"),
        ({"lr": 0.0}, "lr=0.0 must be > 0"),
        ({"consistency_weight": -0.5}, "consistency_weight=-0.5 must be >= 0"),
        ({"align_weight": 0.0, "consistency_weight": 0.0, "responsiveness_weight": 0.0}, "all objective weights are 0"),
    ],
)
def test_bad_settings_raise(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_strategy("trm", **options)
    with pytest.raises(ValueError, match=message):
        TRMSettings(**options)
