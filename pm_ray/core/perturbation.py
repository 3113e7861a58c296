"""P&M stage 1: train with a perturbation along the task vector.

P&M adds λ·Δᵀ H_t Δ to the task loss, using the finite difference

    Δᵀ H Δ ≈ [L(θ + εΔ) + L(θ − εΔ) − 2 L(θ)] / ε².

Instead of three passes per step, every optimizer step draws ONE branch b ∈ {0, +, −} with
probabilities (p0, p+, p−) and runs one forward/backward at θ + (s_b − 1)Δ, with s_b ∈ {1, 1+ε, 1−ε}.
With LoRA, Δ = scaling · B A, so θ + (s_b − 1)Δ is exactly the LoRA_t branch with its
``scaling`` multiplied by s_b:

    W + s_b · scaling · B A

— a change of one Python float per layer, set before the step and restored after it; no extra
pass and no copy of any weight. Draws depend only on (seed, rank, step), so runs are reproducible
and data-parallel ranks draw independently.

Ablation modes: ``none`` (always branch 0) and ``gaussian``: isotropic Gaussian noise on LoRA B with
the magnitude of the task-vector perturbation. Exactly: on branches + and −, per module, draw
N ~ N(0, I) with the shape of B and set B ← B ± c·N, with c chosen so that

    ‖scaling · (c·N) A‖_F = ε · ‖scaling · B A‖_F = ε · ‖Δ‖_F,

i.e. the weight moves by as much as under the task-vector branch, in a random direction (branch −
uses the opposite direction of the same draw). Branch 0 adds nothing. B is saved (it is small,
d_out x r) and copied back exactly afterwards.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

import torch

from pm_ray.core.lora import lora_layers

PERTURBATION_MODES = ("none", "task_vector", "gaussian")


class Branch(IntEnum):
    ZERO = 0
    PLUS = 1
    MINUS = 2


def _generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``parts`` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _check_index(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _sq_norm_of_product(scaling: float, B: torch.Tensor, A: torch.Tensor) -> float:
    """‖scaling · B A‖_F² from r x r Gram matrices, without forming the dense d_out x d_in product."""
    B64, A64 = B.detach().to(torch.float64), A.detach().to(torch.float64)
    return scaling**2 * float(((B64.T @ B64) * (A64 @ A64.T)).sum())


@dataclass(frozen=True)
class Perturbation:
    """Which branch each step trains on, and how the branch is applied to the LoRA_t adapter."""

    mode: str = "task_vector"
    epsilon: float = 0.5
    probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in PERTURBATION_MODES:
            raise ValueError(f"perturbation mode {self.mode!r} is unknown; expected one of {PERTURBATION_MODES}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not 0 <= self.epsilon < 1:
            raise ValueError(f"perturbation epsilon must be a number in [0, 1), got {self.epsilon!r}")
        try:
            probs = tuple(float(p) for p in self.probs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"perturbation probs must be three numbers (p0, p+, p-), got {self.probs!r}") from err
        if len(probs) != 3 or any(not math.isfinite(p) or p < 0 for p in probs):
            raise ValueError(f"perturbation probs must be three non-negative numbers (p0, p+, p-), got {self.probs!r}")
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"perturbation probs must sum to 1, got {self.probs!r} (sum {sum(probs):.6g})")
        _check_index("perturbation seed", self.seed)
        # Frozen dataclass: normalise a list from a config file into the declared tuple of floats.
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "epsilon", float(self.epsilon))

    def draw(self, rank: int, step: int) -> Branch:
        """The branch of optimizer step ``step`` on data-parallel rank ``rank`` (deterministic)."""
        _check_index("rank", rank)
        _check_index("step", step)
        if self.mode == "none":
            return Branch.ZERO
        u = float(torch.rand((), generator=_generator("branch", self.seed, rank, step)))
        p0, p_plus, _ = self.probs
        if u < p0:
            return Branch.ZERO
        if u < p0 + p_plus:
            return Branch.PLUS
        # Guard the p− = 0 case against u landing in the float gap between p0 + p+ and 1.
        return Branch.MINUS if self.probs[2] > 0 else Branch.PLUS if p_plus > 0 else Branch.ZERO

    def scale(self, branch: Branch) -> float:
        """The factor s_b on the task vector: 1, 1 + ε, 1 − ε."""
        return {Branch.ZERO: 1.0, Branch.PLUS: 1.0 + self.epsilon, Branch.MINUS: 1.0 - self.epsilon}[Branch(branch)]

    @contextmanager
    def apply(self, model: torch.nn.Module, rank: int, step: int, adapter_name: str = "default") -> Iterator[Branch]:
        """Perturb ``adapter_name`` for one training step and yield the drawn branch.

        Run the step's forward and backward inside the block and ``optimizer.step()`` after it
        (for ``gaussian`` the saved B is copied back on exit, which would undo an update made
        inside). The original scaling / B is restored on exit, also when the block raises.
        """
        branch = self.draw(rank, step)
        if self.mode == "none":
            yield branch
            return
        layers = lora_layers(model, adapter_name)  # fails fast on a wrong adapter name, any branch
        if branch == Branch.ZERO:
            yield branch
        elif self.mode == "task_vector":
            with self._rescaled(layers, adapter_name, self.scale(branch)):
                yield branch
        else:
            with self._gaussian(layers, adapter_name, branch, rank, step):
                yield branch

    @staticmethod
    @contextmanager
    def _rescaled(layers: dict, adapter_name: str, factor: float) -> Iterator[None]:
        original = {key: layer.scaling[adapter_name] for key, layer in layers.items()}
        try:
            for key, layer in layers.items():
                layer.scaling[adapter_name] = original[key] * factor
            yield
        finally:
            for key, layer in layers.items():
                layer.scaling[adapter_name] = original[key]

    @contextmanager
    def _gaussian(self, layers: dict, adapter_name: str, branch: Branch, rank: int, step: int) -> Iterator[None]:
        sign = 1.0 if branch == Branch.PLUS else -1.0
        generator = _generator("gaussian", self.seed, rank, step)
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for key in sorted(layers):  # sorted: the same noise per module on every rank layout
                    layer = layers[key]
                    A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                    scaling = float(layer.scaling[adapter_name])
                    noise = torch.randn(B.shape, generator=generator, dtype=torch.float32).to(B.device)
                    delta_sq = _sq_norm_of_product(scaling, B, A)
                    noise_sq = _sq_norm_of_product(scaling, noise, A)
                    saved[key] = B.detach().clone()
                    if delta_sq == 0.0 or noise_sq == 0.0:
                        continue  # Δ = 0 (e.g. B at its zero init): the matched perturbation is zero
                    c = self.epsilon * math.sqrt(delta_sq / noise_sq)
                    B.add_((sign * c * noise).to(B.dtype))
            yield
        finally:
            with torch.no_grad():
                for key, original in saved.items():
                    layers[key].lora_B[adapter_name].weight.copy_(original)
