"""One adapter for a merged model: exact concatenation and truncated SVD against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pm_ray.core.lowrank import concat_factors, relative_error, truncated_svd


def test_concatenated_factors_give_the_weighted_sum_of_products() -> None:
    g = torch.Generator().manual_seed(0)
    terms = [
        (c, torch.randn(r, 7, generator=g), torch.randn(5, r, generator=g)) for c, r in ((0.5, 2), (-1.25, 3), (2.0, 1))
    ]
    A, B = concat_factors(terms)
    assert A.shape == (6, 7) and B.shape == (5, 6)
    expected = sum(c * b.double() @ a.double() for c, a, b in terms)
    torch.testing.assert_close((B.double() @ A.double()), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no adapter terms"):
        concat_factors([])


def test_truncated_svd_error_is_the_tail_of_the_spectrum() -> None:
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(12, 9, generator=g)
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    for k in (1, 3, 8):
        A, B, err = truncated_svd(delta, k)
        assert A.shape == (k, 9) and B.shape == (12, k) and A.dtype == torch.float32
        tail = float(np.sqrt((s[k:] ** 2).sum()) / np.sqrt((s**2).sum()))
        assert err == pytest.approx(tail, rel=1e-5)
        measured = float(
            np.linalg.norm(delta.double().numpy() - B.double().numpy() @ A.double().numpy())
            / np.linalg.norm(delta.double().numpy())
        )
        assert err == pytest.approx(measured, rel=1e-12)
        # Eckart-Young: no other rank-k factorisation does better (a random one, and the optimum shifted)
        Ar, Br = torch.randn(k, 9, generator=g), torch.randn(12, k, generator=g)
        assert relative_error(delta, Ar, Br) > err
        assert relative_error(delta, A * 1.01, B) > err


def test_full_rank_is_exact_and_zero_is_zero() -> None:
    delta = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    A, B, err = truncated_svd(delta, 10)  # more than min(d_out, d_in)
    assert A.shape == (4, 4) and err < 1e-6
    torch.testing.assert_close(B @ A, delta, rtol=1e-5, atol=1e-5)
    assert truncated_svd(torch.zeros(3, 5), 2)[2] == 0.0
    with pytest.raises(ValueError, match="rank must be >= 1"):
        truncated_svd(delta, 0)
