from __future__ import annotations

import math

import pytest
import torch

from pm_ray.core import tensors
from pm_ray.core.tensors import check_finite, check_fisher, dot64


@pytest.mark.parametrize("chunk", [1 << 16, 1 << 22])
def test_dot64_is_an_exactly_rounded_sum_over_chunks(chunk, monkeypatch):
    """200k float32 entries (4 chunks of 64k, the last one partial, or one chunk): the float64
    products of float32 are exact, so the result matches math.fsum of them to float64 summation error."""
    monkeypatch.setattr(tensors, "_DOT_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 500, generator=gen) * 1e3
    b = torch.randn(400, 500, generator=gen)
    exact = math.fsum((a.double() * b.double()).reshape(-1).tolist())
    assert dot64(a, b) == pytest.approx(exact, rel=1e-12)
    assert dot64(a[:0], b[:0]) == 0.0


def test_dot64_refuses_different_shapes():
    with pytest.raises(ValueError, match=r"dot64: shapes \(2, 3\) and \(3, 2\) differ"):
        dot64(torch.ones(2, 3), torch.ones(3, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 517, -1])
def test_check_finite_finds_one_bad_entry_anywhere(bad, where):
    t = torch.rand(30, 40)
    t.view(-1)[where] = bad
    with pytest.raises(ValueError, match=r"delta\['m'\] contains NaN or Inf values"):
        check_finite({"ok": torch.rand(3), "m": t}, name="delta")
    with pytest.raises(ValueError, match=r"fisher\['m'\] contains NaN or Inf values"):
        check_fisher({"m": t.abs()})
    check_finite({"m": torch.rand(30, 40), "empty": torch.zeros(0, 4)}, name="delta")  # no error


def test_check_fisher_refuses_negative_entries_and_accepts_zeros():
    f = torch.rand(5, 6)
    f[2, 3] = -2.5e-3
    with pytest.raises(ValueError, match=r"fisher of task 3\['m'\] has negative entries \(min -0.0025\)"):
        check_fisher({"m": f}, name="fisher of task 3")
    check_fisher({"m": torch.zeros(5, 6), "empty": torch.zeros(0)})


def test_check_cache_trusts_only_the_same_unchanged_tensor():
    cache = tensors.CheckCache()
    t = torch.rand(3, 4)
    check_finite({"m": t}, name="delta", cache=cache)
    assert cache.passed("finite", t) and not cache.passed("fisher", t)
    assert not cache.passed("finite", t.clone())  # equal values, another tensor
    t[0, 0] = float("nan")  # in place: the version counter moves, so it is checked again
    assert not cache.passed("finite", t)
    with pytest.raises(ValueError, match=r"delta\['m'\] contains NaN"):
        check_finite({"m": t}, name="delta", cache=cache)
    with torch.inference_mode():
        frozen = torch.rand(2)
    check_fisher({"m": frozen}, cache=cache)  # no version counter: never cached
    assert not cache.passed("fisher", frozen)
    cache.clear()
    assert not cache._passed
