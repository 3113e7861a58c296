from __future__ import annotations

import math

import pytest
import torch

from pm_ray.core.tensors import dot64


def test_dot64_is_an_exactly_rounded_sum_over_chunks():
    """200k float32 entries (4 chunks, the last one partial): the float64 products of float32 are
    exact, so the result matches math.fsum of them to float64 summation error."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 500, generator=gen) * 1e3
    b = torch.randn(400, 500, generator=gen)
    exact = math.fsum((a.double() * b.double()).reshape(-1).tolist())
    assert dot64(a, b) == pytest.approx(exact, rel=1e-12)
    assert dot64(a[:0], b[:0]) == 0.0


def test_dot64_refuses_different_shapes():
    with pytest.raises(ValueError, match=r"dot64: shapes \(2, 3\) and \(3, 2\) differ"):
        dot64(torch.ones(2, 3), torch.ones(3, 2))
