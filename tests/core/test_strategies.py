"""Each merge strategy against a literal element-by-element reference on small tensors."""

from __future__ import annotations

import random

import pytest
import torch

from pm_ray.core.coefficient import optimal_alpha
from pm_ray.core.strategies import STRATEGIES, TaskUpdate, available_strategies, build_strategy
from pm_ray.core.strategies.dare import dare_mask

KEYS = {"a.k_proj": (2, 3), "a.v_proj": (3, 2)}
T = 4


def stream(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    deltas = [{k: torch.randn(s, generator=gen) for k, s in KEYS.items()} for _ in range(T)]
    fishers = [{k: torch.rand(s, generator=gen) for k, s in KEYS.items()} for _ in range(T)]
    return deltas, fishers


def run(strategy, deltas, fishers):
    results = []
    for t, (d, f) in enumerate(zip(deltas, fishers), start=1):
        results.append(strategy.merge(TaskUpdate(task=t, delta=d, fisher=f)))
    return results


def elements(shape):
    return [(i, j) for i in range(shape[0]) for j in range(shape[1])]


def test_registry() -> None:
    assert available_strategies() == [
        "average",
        "dare",
        "fisher_elementwise",
        "fixed",
        "magmax",
        "olora",
        "pm",
        "sequential",
        "ties",
        "trm",
    ]
    with pytest.raises(ValueError, match="unknown merge strategy 'magmx'.*did you mean 'magmax'"):
        build_strategy("magmx")
    with pytest.raises(ValueError, match="has no option 'lamda'.*did you mean 'lam'"):
        build_strategy("magmax", lamda=0.3)


@pytest.mark.parametrize(
    "name,alpha_of_t",
    [
        ("sequential", lambda t: 1.0),
        ("olora", lambda t: 1.0),
        ("average", lambda t: 1.0 / t),
        ("fixed", lambda t: 1.0 if t == 1 else 0.3),
    ],
)
def test_line_merges(name, alpha_of_t) -> None:
    deltas, fishers = stream()
    strategy = build_strategy(name, **({"alpha": 0.3} if name == "fixed" else {}))
    results = run(strategy, deltas, fishers)
    for key, shape in KEYS.items():
        for i, j in elements(shape):
            merged = 0.0
            for t in range(1, T + 1):
                merged = merged + alpha_of_t(t) * float(deltas[t - 1][key][i, j])
                assert float(results[t - 1].merged[key][i, j]) == pytest.approx(merged, abs=1e-6)
                assert results[t - 1].alpha == pytest.approx(alpha_of_t(t))
                assert torch.equal(results[t - 1].start_next[key], results[t - 1].merged[key])


def test_average_is_the_mean_of_experts() -> None:
    deltas, fishers = stream(1)
    results = run(build_strategy("average"), deltas, fishers)
    experts, start = [], {k: torch.zeros(s) for k, s in KEYS.items()}
    for d, r in zip(deltas, results):
        experts.append({k: start[k] + d[k] for k in KEYS})
        start = r.start_next
        for k in KEYS:
            assert torch.allclose(r.merged[k], torch.stack([e[k] for e in experts]).mean(0), atol=1e-6)


@pytest.mark.parametrize("per_module", [False, True])
def test_pm_uses_the_closed_form(per_module: bool) -> None:
    deltas, fishers = stream(2)
    results = run(build_strategy("pm", per_module=per_module), deltas, fishers)
    merged = {k: torch.zeros(s) for k, s in KEYS.items()}
    experts = []
    for t, (d, _f, r) in enumerate(zip(deltas, fishers, results), start=1):
        experts.append({k: merged[k] + d[k] for k in KEYS})
        ref = optimal_alpha(d, merged, experts, fishers[:t], per_module=per_module)
        if per_module:
            assert r.alpha == pytest.approx(ref, abs=1e-6)
        else:
            assert r.alpha == pytest.approx(ref, abs=1e-6)
        for key, shape in KEYS.items():
            a = ref[key] if per_module else ref
            for i, j in elements(shape):
                assert float(r.merged[key][i, j]) == pytest.approx(
                    float(merged[key][i, j]) + a * float(d[key][i, j]), abs=1e-5
                )
        merged = r.merged
    assert results[0].alpha == (pytest.approx({k: 1.0 for k in KEYS}) if per_module else pytest.approx(1.0))


def test_pm_needs_fisher_and_order() -> None:
    deltas, _ = stream()
    strategy = build_strategy("pm")
    with pytest.raises(ValueError, match="needs the Fisher of task 1"):
        strategy.merge(TaskUpdate(task=1, delta=deltas[0]))
    with pytest.raises(ValueError, match="got task 2, expected task 1"):
        build_strategy("sequential").merge(TaskUpdate(task=2, delta=deltas[0]))


def cumulative(deltas):
    """τ_t = Σ_{i≤t} Δ_i, element by element (experts chained)."""
    out, running = [], {k: [[0.0] * s[1] for _ in range(s[0])] for k, s in KEYS.items()}
    for d in deltas:
        for k, s in KEYS.items():
            for i, j in elements(s):
                running[k][i][j] += float(d[k][i, j])
        out.append({k: [row[:] for row in running[k]] for k in KEYS})
    return out


def test_magmax() -> None:
    deltas, fishers = stream(3)
    results = run(build_strategy("magmax", lam=0.5), deltas, fishers)
    taus = cumulative(deltas)
    for t, r in enumerate(results, start=1):
        for k, s in KEYS.items():
            for i, j in elements(s):
                best = 0.0
                for tau in taus[:t]:
                    if abs(tau[k][i][j]) >= abs(best):  # ties to the later task
                        best = tau[k][i][j]
                assert float(r.merged[k][i, j]) == pytest.approx(0.5 * best, abs=1e-6)
                assert float(r.start_next[k][i, j]) == pytest.approx(taus[t - 1][k][i][j], abs=1e-6)


def literal_ties(values_per_task: list[list[float]], density: float) -> list[float]:
    trimmed = []
    for values in values_per_task:
        keep = max(1, -(-int(round(density * len(values) * 1e6)) // 1_000_000))  # ceil(density·n)
        order = sorted(range(len(values)), key=lambda n: -abs(values[n]))[:keep]
        trimmed.append([values[n] if n in order else 0.0 for n in range(len(values))])
    merged = []
    for n in range(len(values_per_task[0])):
        mass = sum(tv[n] for tv in trimmed)
        sign = (mass > 0) - (mass < 0)
        chosen = [tv[n] for tv in trimmed if tv[n] != 0 and ((tv[n] > 0) - (tv[n] < 0)) == sign]
        merged.append(sum(chosen) / len(chosen) if chosen else 0.0)
    return merged


def test_ties() -> None:
    deltas, fishers = stream(4)
    results = run(build_strategy("ties", density=0.5, lam=0.55), deltas, fishers)
    taus = cumulative(deltas)
    for t, r in enumerate(results, start=1):
        for k, s in KEYS.items():
            flat = [[tau[k][i][j] for i, j in elements(s)] for tau in taus[:t]]
            expected = literal_ties(flat, 0.5)
            got = r.merged[k].flatten().tolist()
            assert got == pytest.approx([0.55 * e for e in expected], abs=1e-6)


def test_dare() -> None:
    deltas, fishers = stream(5)
    results = run(build_strategy("dare", drop=0.5, lam=1.0, seed=11), deltas, fishers)
    taus = cumulative(deltas)
    kept_fraction = []
    for t, r in enumerate(results, start=1):
        for k, s in KEYS.items():
            masks = [dare_mask(torch.Size(s), 0.5, seed=11, task=i, key=k) for i in range(1, t + 1)]
            for i, j in elements(s):
                total = sum(float(masks[n][i, j]) * taus[n][k][i][j] / 0.5 for n in range(t))
                assert float(r.merged[k][i, j]) == pytest.approx(total / t, abs=1e-5)
            kept_fraction += [float(m.mean()) for m in masks]
    assert 0.2 < sum(kept_fraction) / len(kept_fraction) < 0.8
    # a different seed draws different masks; the same seed the same ones
    again = run(build_strategy("dare", drop=0.5, seed=11), deltas, fishers)
    other = run(build_strategy("dare", drop=0.5, seed=12), deltas, fishers)
    assert all(torch.equal(again[-1].merged[k], results[-1].merged[k]) for k in KEYS)
    assert not all(torch.equal(other[-1].merged[k], results[-1].merged[k]) for k in KEYS)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_save_load_resumes_identically(name: str, tmp_path) -> None:
    deltas, fishers = stream(6)
    uninterrupted = run(build_strategy(name), deltas, fishers)
    first = build_strategy(name)
    for t in (1, 2):
        first.merge(TaskUpdate(task=t, delta=deltas[t - 1], fisher=fishers[t - 1]))
    first.save(tmp_path / "state.safetensors")
    resumed = build_strategy(name)
    resumed.load(tmp_path / "state.safetensors")
    for t in (3, 4):
        r = resumed.merge(TaskUpdate(task=t, delta=deltas[t - 1], fisher=fishers[t - 1]))
    assert r.alpha == uninterrupted[-1].alpha
    for k in KEYS:
        assert torch.equal(r.merged[k], uninterrupted[-1].merged[k])
        assert torch.equal(r.start_next[k], uninterrupted[-1].start_next[k])
    with pytest.raises(ValueError, match="expected 'magmax'|expected 'sequential'"):
        build_strategy("magmax" if name != "magmax" else "sequential").load(tmp_path / "state.safetensors")


def test_bad_options_and_inputs() -> None:
    with pytest.raises(ValueError, match="alpha=1.5 is outside"):
        build_strategy("fixed", alpha=1.5)
    with pytest.raises(ValueError, match="density=0"):
        build_strategy("ties", density=0)
    with pytest.raises(ValueError, match="drop=1.0"):
        build_strategy("dare", drop=1.0)
    deltas, fishers = stream()
    s = build_strategy("sequential")
    s.merge(TaskUpdate(task=1, delta=deltas[0]))
    with pytest.raises(ValueError, match="a.v_proj"):
        s.merge(TaskUpdate(task=2, delta={"a.k_proj": deltas[1]["a.k_proj"]}))
    nan = {k: v.clone() for k, v in deltas[1].items()}
    nan["a.k_proj"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        s.merge(TaskUpdate(task=2, delta=nan))
    random.seed(0)


def test_strategies_say_what_they_are() -> None:
    """The flags the merge actors and the worker loop read instead of strategy names."""
    flags = {
        name: (cls.train_from, cls.needs_fisher, cls.solves_line_alpha, cls.keeps_adapter_stack, cls.has_worker_step)
        for name, cls in STRATEGIES.items()
    }
    assert [name for name, cls in STRATEGIES.items() if cls.trains_orthogonal] == ["olora"]
    assert flags == {
        "sequential": ("merged", False, False, True, False),
        "olora": ("merged", False, False, True, False),
        "average": ("merged", False, False, True, False),
        "fixed": ("merged", False, False, True, False),
        "pm": ("merged", True, True, True, False),
        "fisher_elementwise": ("merged", True, True, False, False),
        "trm": ("merged", True, True, False, True),
        "magmax": ("expert", False, False, False, False),
        "ties": ("expert", False, False, False, False),
        "dare": ("expert", False, False, False, False),
    }
    assert build_strategy("pm").global_alpha and not build_strategy("pm", per_module=True).global_alpha
    assert (
        build_strategy("trm", snapshots=3).record_steps(10) == [3, 6, 10]
        and build_strategy("pm").record_steps(10) == []
    )
    assert build_strategy("trm", steps=2).worker_batches == 2 and build_strategy("trm").worker_batches == 4


def pm_after_two_tasks():
    deltas, fishers = stream(7)
    strategy = build_strategy("pm")
    run(strategy, deltas[:2], fishers[:2])
    return strategy, deltas[2], fishers[2]


def pm_state(strategy) -> list[torch.Tensor]:
    acc = strategy.accumulator
    return [t.clone() for d in (strategy.merged, acc.phi, acc.psi) for t in d.values()]


def test_the_two_phases_read_each_tensor_once_for_its_checks(monkeypatch) -> None:
    """partials() then merge() on the same tensors (in-process, as the merge shard does): one
    min/max pass over each F module, none over Δ (its finiteness shows in the partial sums); a Δ
    that arrives as new tensors for the merge (through Ray) is checked there once."""
    from pm_ray.core import tensors

    scanned: list[int] = []
    real = tensors._min_max
    monkeypatch.setattr(tensors, "_min_max", lambda t: scanned.append(id(t)) or real(t))
    strategy, delta, fisher = pm_after_two_tasks()
    scanned.clear()
    update = TaskUpdate(task=3, delta=delta, fisher=fisher)
    strategy.merge(update, alpha=strategy.solve_alpha(strategy.partials(update)))
    assert sorted(scanned) == sorted(id(f) for f in fisher.values())
    strategy, delta, fisher = pm_after_two_tasks()
    update = TaskUpdate(task=3, delta=delta, fisher=fisher)
    alpha = strategy.solve_alpha(strategy.partials(update))
    scanned.clear()
    copies = {k: d.clone() for k, d in delta.items()}
    strategy.merge(TaskUpdate(task=3, delta=copies, fisher=fisher), alpha=alpha)
    assert sorted(scanned) == sorted(id(d) for d in copies.values())


def test_a_tensor_changed_after_the_partials_is_checked_again_and_nothing_changes() -> None:
    strategy, delta, fisher = pm_after_two_tasks()
    update = TaskUpdate(task=3, delta=delta, fisher=fisher)
    alpha = strategy.solve_alpha(strategy.partials(update))
    before = pm_state(strategy)
    delta["a.v_proj"][1, 1] = float("inf")  # in place: the version counter moves
    with pytest.raises(ValueError, match=r"delta of task 3\['a.v_proj'\] contains NaN or Inf"):
        strategy.merge(update, alpha=alpha)
    fisher["a.v_proj"][0, 0] = -1.0
    delta["a.v_proj"][1, 1] = 0.0
    with pytest.raises(ValueError, match=r"fisher of task 3\['a.v_proj'\] has negative entries"):
        strategy.merge(update, alpha=alpha)
    assert strategy.num_tasks == 2 and strategy.accumulator.num_tasks == 2
    assert all(torch.equal(a, b) for a, b in zip(pm_state(strategy), before))


@pytest.mark.parametrize("per_module", [False, True])
def test_pm_in_place_writes_the_same_bits_into_the_old_tensors(per_module: bool) -> None:
    """in_place (the merge actor's setting): θ̂_t lands in θ̂_{t-1}'s tensors, with the bits, α and
    accumulators of the merge into new tensors."""
    deltas, fishers = stream(8)
    fresh, in_place = build_strategy("pm", per_module=per_module), build_strategy("pm", per_module=per_module)
    in_place.in_place = True
    for t, (d, f) in enumerate(zip(deltas, fishers), start=1):
        before = dict(in_place.merged)
        a, b = fresh.merge(TaskUpdate(task=t, delta=d, fisher=f)), in_place.merge(TaskUpdate(task=t, delta=d, fisher=f))
        assert a.alpha == b.alpha
        for key in KEYS:
            assert torch.equal(a.merged[key], b.merged[key]) and b.start_next[key] is b.merged[key]
            assert torch.equal(fresh.accumulator.phi[key], in_place.accumulator.phi[key])
            assert torch.equal(fresh.accumulator.psi[key], in_place.accumulator.psi[key])
            assert t == 1 or b.merged[key] is before[key]  # no new θ̂ tensor after the first task
