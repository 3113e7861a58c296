"""fisher_elementwise against brute-force references: a literal implementation that keeps every
past task, a dense solve of the quadratic objective, the pm strategy, and a sharded merge."""

from __future__ import annotations

import pytest
import torch

from pm_ray.config import ConfigError, load_config
from pm_ray.core.coefficient import add_partials, optimal_alpha
from pm_ray.core.strategies import StrategyOptionError, TaskUpdate, build_strategy

KEYS = {"a.k_proj": (2, 3), "a.v_proj": (3, 2), "b.k_proj": (2, 2), "b.v_proj": (1, 4)}
T = 4


def stream(seed: int = 0, scales: tuple[float, ...] = (1.0, 30.0, 0.05, 4.0)):
    """Random deltas and Fishers; the tasks' Fisher scales differ (as loss scales do)."""
    gen = torch.Generator().manual_seed(seed)
    deltas = [{k: torch.randn(s, generator=gen) for k, s in KEYS.items()} for _ in range(T)]
    fishers = [{k: scales[t] * torch.rand(s, generator=gen) for k, s in KEYS.items()} for t in range(T)]
    return deltas, fishers


def run(strategy, deltas, fishers):
    return [
        strategy.merge(TaskUpdate(task=t, delta=d, fisher=f)) for t, (d, f) in enumerate(zip(deltas, fishers), start=1)
    ]


def literal(deltas, fishers, *, damping=0.0, blend=1.0, normalize_fisher=False, decay=1.0, per_module=False):
    """Every past F_i and θ*_i kept; each merged element computed on its own, in float64:
    θ = (1−β)(θ̂_{t-1} + α Δ_t) + β Σ_i w_i F̃_i θ*_i / (Σ_i w_i F̃_i + λ),  w_i = γ^{t−i}."""
    merged = {k: torch.zeros(s, dtype=torch.float64) for k, s in KEYS.items()}
    experts, tilde, out = [], [], []
    for t, (d, f) in enumerate(zip(deltas, fishers), start=1):
        tilde.append({k: f[k].double() / f[k].double().mean() if normalize_fisher else f[k].double() for k in KEYS})
        experts.append({k: merged[k] + d[k].double() for k in KEYS})
        weights = [decay ** (t - i) for i in range(1, t + 1)]
        weighted = [{k: w * F[k] for k in KEYS} for w, F in zip(weights, tilde)]
        alpha = optimal_alpha(d, merged, experts, weighted, per_module=per_module)
        new = {}
        for k, shape in KEYS.items():
            a = alpha[k] if per_module else alpha
            lam = damping * float(sum(wf[k] for wf in weighted).mean())
            new[k] = torch.zeros(shape, dtype=torch.float64)
            for i in range(shape[0]):
                for j in range(shape[1]):
                    line = float(merged[k][i, j]) + a * float(d[k][i, j])
                    num = sum(float(wf[k][i, j]) * float(e[k][i, j]) for wf, e in zip(weighted, experts))
                    den = sum(float(wf[k][i, j]) for wf in weighted) + lam
                    elem = num / den if den > 0 else line
                    new[k][i, j] = (1 - blend) * line + blend * elem
        merged = new
        out.append((alpha, merged))
    return out


def objective(theta, experts, fishers, weights, lams):
    """Q(θ) = Σ_i w_i ½ (θ − θ*_i)ᵀ F̃_i (θ − θ*_i) + Σ_m ½ λ_m ‖θ_m‖², float64."""
    total = sum(0.5 * lams[k] * (theta[k].double() ** 2).sum() for k in KEYS)
    for w, e, f in zip(weights, experts, fishers):
        total = total + sum(0.5 * w * (f[k].double() * (theta[k].double() - e[k].double()) ** 2).sum() for k in KEYS)
    return total


def history(deltas, fishers, results, normalize_fisher=False):
    """The experts θ*_i = θ̂_{i-1} + Δ_i of a run, and the Fishers as the strategy weighs them."""
    experts, prev = [], {k: torch.zeros(s) for k, s in KEYS.items()}
    for d, r in zip(deltas, results):
        experts.append({k: prev[k].double() + d[k].double() for k in KEYS})
        prev = r.merged
    tilde = [
        {k: f[k].double() / f[k].double().mean() if normalize_fisher else f[k].double() for k in KEYS} for f in fishers
    ]
    return experts, tilde


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"damping": 0.0},
        {"damping": 0.1, "blend": 0.3},
        {"normalize_fisher": True, "damping": 0.01},
        {"decay": 0.5, "blend": 0.7},
        {"normalize_fisher": True, "decay": 0.8, "damping": 0.05, "blend": 0.6, "per_module": True},
    ],
)
def test_matches_the_literal_form_that_keeps_every_task(options) -> None:
    deltas, fishers = stream(1)
    results = run(build_strategy("fisher_elementwise", **options), deltas, fishers)
    reference = literal(deltas, fishers, **{"damping": 1e-4, **options})
    for r, (alpha, merged) in zip(results, reference):
        assert r.alpha == pytest.approx(alpha, rel=1e-5, abs=1e-6)
        for k in KEYS:
            torch.testing.assert_close(r.merged[k].double(), merged[k], rtol=1e-5, atol=1e-5)
            assert r.start_next[k] is r.merged[k]  # task t+1 trains from the merged model


def test_decay_one_and_no_normalisation_are_the_plain_form() -> None:
    deltas, fishers = stream(2)
    plain = run(build_strategy("fisher_elementwise", damping=0.0), deltas, fishers)
    explicit = run(
        build_strategy("fisher_elementwise", damping=0.0, decay=1.0, normalize_fisher=False, blend=1.0), deltas, fishers
    )
    experts, tilde = history(deltas, fishers, plain)
    for t, (p, e) in enumerate(zip(plain, explicit), start=1):
        for k in KEYS:
            assert torch.equal(p.merged[k], e.merged[k])
            fisher_sum = sum(f[k] for f in tilde[:t])
            torch.testing.assert_close(
                p.merged[k].double(),
                sum(f[k] * x[k] for f, x in zip(tilde[:t], experts[:t])) / fisher_sum,
                rtol=1e-5,
                atol=1e-6,
            )


@pytest.mark.parametrize("options", [{"damping": 0.0}, {"damping": 0.2, "decay": 0.7, "normalize_fisher": True}])
def test_minimises_the_quadratic_objective_dense_solve(options) -> None:
    """θ̂_t = argmin Q_t, from the dense Hessian and gradient of Q_t (autograd) and a linear solve."""
    deltas, fishers = stream(3)
    strategy = build_strategy("fisher_elementwise", **options)
    results = run(strategy, deltas, fishers)
    experts, tilde = history(deltas, fishers, results, options.get("normalize_fisher", False))
    gamma, damping = options.get("decay", 1.0), options["damping"]
    sizes = {k: s[0] * s[1] for k, s in KEYS.items()}
    for t, r in enumerate(results, start=1):
        weights = [gamma ** (t - i) for i in range(1, t + 1)]
        lams = {k: damping * float(sum(w * f[k] for w, f in zip(weights, tilde[:t])).mean()) for k in KEYS}

        def q_flat(x, t=t, weights=weights, lams=lams):
            parts = dict(zip(KEYS, torch.split(x, list(sizes.values()))))
            theta = {k: parts[k].view(KEYS[k]) for k in KEYS}
            return objective(theta, experts[:t], tilde[:t], weights, lams)

        zero = torch.zeros(sum(sizes.values()), dtype=torch.float64)
        hessian = torch.autograd.functional.hessian(q_flat, zero)
        gradient = torch.autograd.functional.jacobian(q_flat, zero)
        solution = torch.linalg.solve(hessian, -gradient)  # Q quadratic: its minimiser
        got = torch.cat([r.merged[k].double().flatten() for k in KEYS])
        torch.testing.assert_close(got, solution, rtol=1e-5, atol=1e-5)
        # and no coordinate move lowers Q
        for n in range(0, got.numel(), 3):
            for step in (1e-2, -1e-2):
                moved = got.clone()
                moved[n] += step
                assert q_flat(moved) > q_flat(got)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_beats_the_line_optimum_on_the_objective(seed, damping) -> None:
    """Q_t(elementwise) ≤ Q_t(θ̂_{t-1} + α Δ_t) for P&M's α and for every α on a grid."""
    deltas, fishers = stream(seed)
    results = run(build_strategy("fisher_elementwise", damping=damping), deltas, fishers)
    experts, tilde = history(deltas, fishers, results)
    prev = {k: torch.zeros(s) for k, s in KEYS.items()}
    strict = 0
    for t, r in enumerate(results, start=1):
        weights = [1.0] * t
        lams = {k: damping * float(sum(f[k] for f in tilde[:t]).mean()) for k in KEYS}
        q_elem = objective(r.merged, experts[:t], tilde[:t], weights, lams)
        line = [
            {k: prev[k] + a * deltas[t - 1][k] for k in KEYS} for a in [r.alpha] + torch.linspace(-1, 2, 61).tolist()
        ]
        q_line = min(float(objective(theta, experts[:t], tilde[:t], weights, lams)) for theta in line)
        assert float(q_elem) <= q_line + 1e-9
        strict += float(q_elem) < q_line - 1e-6
        prev = r.merged
    assert strict >= T - 1  # off the line it is strictly better once there are two tasks


@pytest.mark.parametrize("per_module", [False, True])
def test_blend_zero_is_pm_exactly(per_module) -> None:
    deltas, fishers = stream(4)
    pm = run(build_strategy("pm", per_module=per_module), deltas, fishers)
    line = run(build_strategy("fisher_elementwise", blend=0.0, per_module=per_module), deltas, fishers)
    for a, b in zip(pm, line):
        assert a.alpha == b.alpha
        for k in KEYS:
            assert torch.equal(a.merged[k], b.merged[k])


def test_blend_one_is_the_elementwise_optimum() -> None:
    deltas, fishers = stream(5)
    results = run(build_strategy("fisher_elementwise", blend=1.0, damping=0.05), deltas, fishers)
    experts, tilde = history(deltas, fishers, results)
    for t, r in enumerate(results, start=1):
        for k in KEYS:
            phi = sum(f[k] for f in tilde[:t])
            psi = sum(f[k] * e[k] for f, e in zip(tilde[:t], experts[:t]))
            torch.testing.assert_close(r.merged[k].double(), psi / (phi + 0.05 * phi.mean()), rtol=1e-5, atol=1e-6)
        assert r.alpha == pytest.approx(
            optimal_alpha(
                deltas[t - 1],
                results[t - 2].merged if t > 1 else {k: torch.zeros(s) for k, s in KEYS.items()},
                experts[:t],
                tilde[:t],
            ),
            abs=1e-6,
        )


def test_normalisation_makes_the_merge_independent_of_a_tasks_fisher_scale() -> None:
    deltas, fishers = stream(6)
    rescaled = [{k: c * f[k] for k in KEYS} for c, f in zip((1e-3, 1.0, 50.0, 7.0), fishers)]
    a = run(build_strategy("fisher_elementwise", normalize_fisher=True, blend=0.5), deltas, fishers)
    b = run(build_strategy("fisher_elementwise", normalize_fisher=True, blend=0.5), deltas, rescaled)
    c = run(build_strategy("fisher_elementwise", blend=0.5), deltas, rescaled)
    for k in KEYS:
        torch.testing.assert_close(a[-1].merged[k], b[-1].merged[k], rtol=1e-4, atol=1e-5)
    assert not all(torch.allclose(a[-1].merged[k], c[-1].merged[k], atol=1e-3) for k in KEYS)


def test_decay_lets_the_newest_task_win() -> None:
    """Smaller γ: the merge sits closer to the newest expert (Q_t with weights γ^{t−i})."""
    deltas, fishers = stream(7, scales=(1.0, 1.0, 1.0, 1.0))
    distances = []
    for gamma in (1.0, 0.5, 0.1):
        results = run(build_strategy("fisher_elementwise", decay=gamma, damping=0.0), deltas, fishers)
        experts, _ = history(deltas, fishers, results)
        distances.append(sum(float(((results[-1].merged[k].double() - experts[-1][k]) ** 2).sum()) for k in KEYS))
    assert distances[0] > distances[1] > distances[2]


def test_flat_curvature_keeps_the_line_value() -> None:
    deltas, fishers = stream(8)
    for f in fishers:
        f["a.k_proj"][0, 1] = 0.0
        f["b.v_proj"].zero_()  # a module with no curvature at all
    for damping in (0.0, 0.1):
        with pytest.warns(RuntimeWarning, match="α set to 0.0 there"):  # the line α of b.v_proj
            results = run(
                build_strategy("fisher_elementwise", damping=damping, blend=1.0, per_module=True), deltas, fishers
            )
        prev = {k: torch.zeros(s) for k, s in KEYS.items()}
        for t, r in enumerate(results, start=1):
            line = {k: torch.add(prev[k], deltas[t - 1][k], alpha=r.alpha[k]) for k in KEYS}  # as LineMerge
            assert torch.equal(r.merged["b.v_proj"], line["b.v_proj"])  # λ = 0 there whatever the damping
            expected = line["a.k_proj"][0, 1] if damping == 0.0 else torch.tensor(0.0)  # ψ = 0 with λ > 0
            assert float(r.merged["a.k_proj"][0, 1]) == pytest.approx(float(expected), abs=1e-7)
            assert torch.isfinite(r.merged["a.k_proj"]).all()
            prev = r.merged


@pytest.mark.parametrize(
    "options",
    [{"blend": 0.4, "decay": 0.6, "normalize_fisher": True}, {"blend": 0.4, "per_module": True, "damping": 0.1}],
)
def test_two_shards_equal_one(options) -> None:
    """Modules split over two strategy instances; a global α from both shards' summed partials."""
    deltas, fishers = stream(9)
    whole = run(build_strategy("fisher_elementwise", **options), deltas, fishers)
    keys = sorted(KEYS)
    shards = [keys[0::2], keys[1::2]]
    parts = [build_strategy("fisher_elementwise", **options) for _ in shards]
    for t, (d, f) in enumerate(zip(deltas, fishers), start=1):
        updates = [TaskUpdate(task=t, delta={k: d[k] for k in ks}, fisher={k: f[k] for k in ks}) for ks in shards]
        alpha = None
        if not options.get("per_module"):
            alpha = parts[0].solve_alpha(add_partials(*[s.partials(u) for s, u in zip(parts, updates)]))
            assert alpha == pytest.approx(whole[t - 1].alpha, abs=1e-9)
        results = [s.merge(u, alpha=alpha) for s, u in zip(parts, updates)]
        for r, ks in zip(results, shards):
            for k in ks:
                torch.testing.assert_close(r.merged[k], whole[t - 1].merged[k], rtol=1e-6, atol=1e-7)
                if options.get("per_module"):
                    assert r.alpha[k] == pytest.approx(whole[t - 1].alpha[k], abs=1e-9)


def test_resume_with_decay_and_normalisation(tmp_path) -> None:
    options = {"blend": 0.5, "decay": 0.6, "normalize_fisher": True, "damping": 0.01}
    deltas, fishers = stream(10)
    uninterrupted = run(build_strategy("fisher_elementwise", **options), deltas, fishers)
    first = build_strategy("fisher_elementwise", **options)
    for t in (1, 2):
        first.merge(TaskUpdate(task=t, delta=deltas[t - 1], fisher=fishers[t - 1]))
    first.save(tmp_path / "s.safetensors")
    resumed = build_strategy("fisher_elementwise", **options)
    resumed.load(tmp_path / "s.safetensors")
    for t in (3, 4):
        r = resumed.merge(TaskUpdate(task=t, delta=deltas[t - 1], fisher=fishers[t - 1]))
    assert r.alpha == uninterrupted[-1].alpha
    assert all(torch.equal(r.merged[k], uninterrupted[-1].merged[k]) for k in KEYS)


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"blend": 1.5}, "blend=1.5 must be <= 1"),
        ({"blend": -0.1}, "blend=-0.1 must be >= 0"),
        ({"decay": 0.0}, "decay=0.0 must be > 0"),
        ({"decay": 1.2}, "decay=1.2 must be <= 1"),
        ({"damping": -1.0}, "damping=-1.0 must be >= 0"),
        ({"dampnig": 0.1}, "has no option 'dampnig'; did you mean 'damping'?"),
    ],
)
def test_bad_options(options, needle) -> None:
    with pytest.raises(StrategyOptionError) as err:
        build_strategy("fisher_elementwise", **options)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("merge.options.blend=1.5", "merge.options.blend: fisher_elementwise: blend=1.5 must be <= 1"),
        ("merge.options.decay=0", "merge.options.decay: fisher_elementwise: decay=0 must be > 0"),
        (
            "merge.options.normalize_fisher=maybe",
            "merge.options.normalize_fisher: fisher_elementwise: normalize_fisher='maybe'",
        ),
    ],
)
def test_bad_options_at_config_load(override, needle) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["merge.strategy=fisher_elementwise", override])
    assert needle in str(err.value) and "\n" not in str(err.value)
    cfg = load_config(None, ["merge.strategy=fisher_elementwise", "merge.options.blend=0.5", "merge.options.decay=0.9"])
    assert cfg.merge.options == {"blend": 0.5, "decay": 0.9}


def test_needs_fisher() -> None:
    deltas, fishers = stream()
    with pytest.raises(ValueError, match="needs the Fisher of task 1"):
        build_strategy("fisher_elementwise").merge(TaskUpdate(task=1, delta=deltas[0]))
    bad = {k: -f for k, f in fishers[0].items()}
    with pytest.raises(ValueError, match="negative entries"):
        build_strategy("fisher_elementwise").merge(TaskUpdate(task=1, delta=deltas[0], fisher=bad))
