"""One LoRA adapter for a merged model: exact for a line merge, truncated SVD otherwise.

Line merge (a stack of task adapters with coefficients α_t and scales s_t = lora_alpha_t / r_t):

    Δ_m = Σ_t α_{t,m} s_t B_t A_t = B A,   A = [A_1; A_2; ...] (Σ r_t x d_in),
                                           B = [α_1 s_1 B_1, α_2 s_2 B_2, ...] (d_out x Σ r_t)

which is exact (no cross terms: the concatenation along the rank dimension is a block product).
The scales are folded into B, so the adapter is served with scaling lora_alpha / r = 1.

Any dense delta Δ (element-wise merges) at rank k, by the Eckart-Young theorem the best rank-k
approximation in the Frobenius norm:

    Δ = U S Vᵀ,  B = U_k S_k^½,  A = S_k^½ V_kᵀ,   err = ‖Δ − B A‖_F / ‖Δ‖_F = sqrt(Σ_{i>k} s_i²) / ‖Δ‖_F

The reported error is measured on the factors as stored (float32), not taken from the singular
values, so it is what the saved adapter gives. err = 0 when Δ = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def concat_factors(terms: Sequence[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(A, B) with B @ A = Σ coeff_t B_t @ A_t, for terms (coeff_t, A_t: r_t x d_in, B_t: d_out x r_t)."""
    if not terms:
        raise ValueError("no adapter terms to concatenate")
    A = torch.cat([a.float() for _, a, _ in terms], dim=0)
    B = torch.cat([float(c) * b.float() for c, _, b in terms], dim=1)
    return A.contiguous(), B.contiguous()


def relative_error(delta: Tensor, A: Tensor, B: Tensor) -> float:
    """‖Δ − B A‖_F / ‖Δ‖_F in float64 (0 when Δ = 0 and B A = 0)."""
    d = delta.double()
    diff = torch.linalg.matrix_norm(d - B.double() @ A.double()).item()
    norm = torch.linalg.matrix_norm(d).item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """(A: k x d_in, B: d_out x k, relative Frobenius error) of the best rank-k approximation of a
    d_out x d_in delta, k = min(rank, d_out, d_in). Computed in float64, stored in float32."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D delta, got shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.numel())
    # split the singular values evenly between the factors (better conditioned than all in B)
    root = S[:k].sqrt()
    B = (U[:, :k] * root).float().contiguous()
    A = (root[:, None] * Vh[:k]).float().contiguous()
    return A, B, relative_error(delta, A, B)
