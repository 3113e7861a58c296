"""P&M's constant-memory exact α: the running sums Φ = Σ_{i<t} F_i and Ψ = Σ_{i<t} F_i ⊙ θ*_i.

With them the closed form of coefficient.py needs no history of experts or Fishers:

    num = ⟨F_t, Δ_t²⟩ + ⟨Ψ − Φ ⊙ θ̂_{t-1}, Δ_t⟩,    den = ⟨Φ + F_t, Δ_t²⟩,

and after the merge Φ += F_t, Ψ += F_t ⊙ θ*_t (θ*_t = θ̂_{t-1} + Δ_t, relative to W0).

Numerics: accumulators and θ are float32. The three sums of a module's partials are float32
products (F·Δ·Δ, Φ·Δ·Δ and (Ψ − Φ⊙θ̂)·Δ, Ψ − Φ⊙θ̂ formed in float32) summed in float32 by
torch.sum over slices of at most 2^17 entries, the slices and the modules added in float64. Against
the same formula in float64 this is off by 2e-9 to 5e-8 of the sum of the terms' magnitudes on
SmolLM2-sized modules (float64 products of the float32 inputs, used before, by 5e-12 to 4e-11): below
the float32 resolution (6e-8) of the θ̂ that α scales. tests/core/test_coefficient.py holds it to
1e-6, and α to 1e-6 relative of the full-history float64 reference. A module whose float32 sums
overflow is summed again from float64 products (``dot64``); ``optimal_alpha`` is float64 throughout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from pm_ray.core.coefficient import Alpha, Partials, alpha_from_partials
from pm_ray.core.tensors import (
    CheckCache,
    SliceBuffer,
    TensorDict,
    as_cpu32,
    check_finite,
    check_fisher,
    check_same_layout,
    dot64,
    load_tensors,
    save_tensors,
    sliced,
    split_prefixed,
    with_prefix,
)


class CurvatureAccumulator:
    """Constant-memory exact α: Φ = Σ_{i<t} F_i and Ψ = Σ_{i<t} F_i ⊙ θ*_i per module (float32).

    Holds any subset of the modules, so K accumulators can each own a shard: combine their
    ``partials`` with :func:`add_partials` and divide with :func:`alpha_from_partials`.

    Both phases go module by module and slice by slice, reading each tensor from memory once per
    phase, with every product in one reused buffer (a fresh module-sized temporary costs an
    allocation, page faults and the cache). The checks of F_t (finite, >= 0) and Δ_t (finite)
    take a :class:`CheckCache`, so a tensor given to both phases is read for them once.
    """

    def __init__(self) -> None:
        self.phi: TensorDict = {}
        self.psi: TensorDict = {}
        self.num_tasks = 0

    def _check_layout(
        self,
        delta: Mapping[str, torch.Tensor],
        fisher: Mapping[str, torch.Tensor],
        merged_prev: Mapping[str, torch.Tensor],
    ) -> None:
        check_same_layout(delta, fisher, reference_name="delta", other_name="fisher")
        check_same_layout(delta, merged_prev, reference_name="delta", other_name="merged_prev")
        if self.num_tasks:
            check_same_layout(self.phi, delta, reference_name="the accumulator's modules", other_name="delta")

    @torch.no_grad()  # out= and in-place writes; nothing here is differentiated
    def partials(
        self,
        delta: Mapping[str, torch.Tensor],
        fisher: Mapping[str, torch.Tensor],
        merged_prev: Mapping[str, torch.Tensor],
        *,
        cache: CheckCache | None = None,
        delta_name: str = "delta",
        fisher_name: str = "fisher",
    ) -> Partials:
        """(num_m, den_m) for the new task t per module, before it is absorbed.

        num_m = ⟨F, Δ²⟩ + ⟨Ψ − Φ⊙θ̂, Δ⟩ and den_m = ⟨F, Δ²⟩ + ⟨Φ, Δ²⟩, each sum over float32
        products (numerics: module docstring). Δ gets no pass of its own: F ⊙ Δ² is >= 0 or
        NaN/Inf term by term, so ⟨F, Δ²⟩ is finite exactly when Δ is. A module whose sums are not
        finite is checked (a NaN/Inf in Δ raises, naming it) and otherwise, a float32 product
        having overflowed, summed again from float64 products.
        """
        self._check_layout(delta, fisher, merged_prev)
        rows = 3 if self.num_tasks else 1
        buffer = SliceBuffer(rows, delta)
        out: Partials = {}
        for key, d in delta.items():
            f = fisher[key]
            check_fisher({key: f}, name=fisher_name, cache=cache)  # which also brings F into cache
            inputs = [as_cpu32(d), as_cpu32(f)]
            if self.num_tasks:
                inputs += [self.phi[key], self.psi[key], as_cpu32(merged_prev[key])]
            sums = [0.0] * rows
            for dd, ff, *state in sliced(*inputs):
                block, products = buffer(dd.shape)
                torch.mul(ff, dd, out=products[0]).mul_(dd)  # F ⊙ Δ²
                if state:
                    phi, psi, theta = state
                    torch.mul(phi, dd, out=products[1]).mul_(dd)  # Φ ⊙ Δ²
                    torch.addcmul(psi, phi, theta, value=-1.0, out=products[2]).mul_(dd)  # (Ψ − Φ⊙θ̂) ⊙ Δ
                sums = [total + value for total, value in zip(sums, block.sum(dim=1).tolist())]
            if not all(map(math.isfinite, sums)):
                sums = self._float64_sums(key, d, f, merged_prev[key], delta_name, cache)
            elif cache is not None:
                cache.add("finite", d)
            f_d2, phi_d2, rest = (sums + [0.0, 0.0])[:3]
            out[key] = (f_d2 + rest, f_d2 + phi_d2)
        return out

    def _float64_sums(
        self, key: str, d: torch.Tensor, f: torch.Tensor, theta: torch.Tensor, delta_name: str, cache: CheckCache | None
    ) -> list[float]:
        """The sums of one module whose float32 ones are not finite: a NaN/Inf in Δ raises; else a
        float32 product overflowed, and a float64 product of float32 numbers cannot."""
        check_finite({key: d}, name=delta_name, cache=cache)
        d64 = d.double()
        d_sq = d64 * d64
        sums = [dot64(f, d_sq)]
        if self.num_tasks:
            phi, psi = self.phi[key], self.psi[key]
            sums += [dot64(phi, d_sq), dot64(torch.addcmul(psi, phi, theta.float(), value=-1.0), d64)]
        return sums

    def alpha(
        self,
        delta: Mapping[str, torch.Tensor],
        fisher: Mapping[str, torch.Tensor],
        merged_prev: Mapping[str, torch.Tensor],
        *,
        per_module: bool = False,
        clip: bool = True,
    ) -> Alpha:
        return alpha_from_partials(self.partials(delta, fisher, merged_prev), per_module=per_module, clip=clip)

    def absorb(self, fisher: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor]) -> None:
        """Add task t after its merge: Φ += F_t, Ψ += F_t ⊙ θ*_t (θ*_t relative to W0)."""
        self.absorb_step(fisher, {key: torch.zeros_like(e, dtype=torch.float32) for key, e in expert.items()}, expert)

    @torch.no_grad()
    def absorb_step(
        self,
        fisher: Mapping[str, torch.Tensor],
        merged_prev: Mapping[str, torch.Tensor],
        delta: Mapping[str, torch.Tensor],
        *,
        alpha: Alpha | None = None,
        in_place: bool = False,
        cache: CheckCache | None = None,
        delta_name: str = "delta",
        fisher_name: str = "fisher",
    ) -> TensorDict:
        """Add task t with θ*_t = θ̂_{t-1} + Δ_t: Φ += F_t, Ψ += F_t ⊙ θ*_t. With ``alpha`` also
        return the merge θ̂_t = θ̂_{t-1} + α_t Δ_t (α_t per module when a dict), made in the same
        pass, in new tensors or, ``in_place``, in merged_prev's own (the same bits either way);
        θ*_t only ever exists one slice at a time.

        Everything is checked before Φ or Ψ change: layouts, Δ_t, F_t, α's modules and, in_place,
        θ̂_{t-1}'s tensors (the checks of Δ_t and F_t are cache hits for tensors :meth:`partials` saw).
        """
        self._check_layout(delta, fisher, merged_prev)
        check_finite(delta, name=delta_name, cache=cache)
        check_fisher(fisher, name=fisher_name, cache=cache)
        if isinstance(alpha, dict) and set(alpha) != set(delta):
            raise ValueError(f"per-module α covers {len(alpha)} modules but delta has {len(delta)}")
        if in_place and alpha is not None and any(as_cpu32(t) is not t for t in merged_prev.values()):
            raise ValueError("in_place: every merged_prev tensor must be contiguous float32 on the CPU")
        merged: TensorDict = {}
        buffer = SliceBuffer(1, delta)
        for key, d in delta.items():
            d32, f32, theta = as_cpu32(d), as_cpu32(fisher[key]), as_cpu32(merged_prev[key])
            if not self.num_tasks:  # the first task: Φ = F_1, Ψ = F_1 ⊙ θ*_1
                self.phi[key], self.psi[key] = f32.clone(), f32 * (theta + d32)
            a = alpha[key] if isinstance(alpha, dict) else alpha
            targets = [self.phi[key], self.psi[key]]  # written in place, slice by slice
            if a is not None:
                merged[key] = theta if in_place else torch.empty(d32.shape, dtype=torch.float32)
                targets.append(merged[key])
            for dd, ff, tt, phi, psi, *new in sliced(d32, f32, theta, *targets):
                if self.num_tasks:  # before θ̂_{t-1} is overwritten (in_place)
                    theta_star = torch.add(tt, dd, out=buffer(dd.shape)[1][0])
                    phi.add_(ff)
                    psi.addcmul_(ff, theta_star)  # Ψ += F ⊙ θ*
                if new:
                    torch.add(tt, dd, alpha=a, out=new[0])  # θ̂_t = θ̂_{t-1} + α·Δ
        self.num_tasks += 1
        return merged

    def state_dict(self) -> TensorDict:
        return {**with_prefix(self.phi, "phi"), **with_prefix(self.psi, "psi")}

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.state_dict(), {"kind": "curvature_accumulator", "num_tasks": self.num_tasks})

    @classmethod
    def load(cls, path: str | Path) -> CurvatureAccumulator:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "curvature_accumulator":
            raise ValueError(f"{path}: not a curvature accumulator (metadata kind={meta.get('kind')!r})")
        acc = cls()
        acc.num_tasks = int(meta["num_tasks"])  # type: ignore[arg-type]
        acc.phi = split_prefixed(tensors, "phi")
        acc.psi = split_prefixed(tensors, "psi")
        if set(acc.phi) != set(acc.psi):
            raise ValueError(f"{path}: phi and psi cover different modules")
        return acc
