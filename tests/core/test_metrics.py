from __future__ import annotations

import math

import pytest

from pm_ray.core.metrics import continual_metrics

# Worked by hand (T = 3):
#   R = [[0.9,  nan, nan],
#        [0.7,  0.8, nan],
#        [0.6,  0.5, 0.95]]
#   ACC = (0.6 + 0.5 + 0.95)/3 = 0.683333...
#   AAA = (0.9 + (0.7+0.8)/2 + (0.6+0.5+0.95)/3)/3 = (0.9 + 0.75 + 0.683333)/3 = 0.777777...
#   forgetting: task1 max(0.9, 0.7) - 0.6 = 0.3; task2 max(0.8) - 0.5 = 0.3 -> 0.3
#   BWT = ((0.6-0.9) + (0.5-0.8))/2 = -0.3
R = [[0.9, math.nan, math.nan], [0.7, 0.8, math.nan], [0.6, 0.5, 0.95]]


def test_hand_worked_matrix() -> None:
    m = continual_metrics(R)
    assert m["acc"] == pytest.approx(2.05 / 3)
    assert m["aaa"] == pytest.approx((0.9 + 0.75 + 2.05 / 3) / 3)
    assert m["forgetting"] == pytest.approx(0.3)
    assert m["bwt"] == pytest.approx(-0.3)
    assert "fwt" not in m


def test_forgetting_uses_the_best_earlier_score() -> None:
    # task 1 rose after task 2 (0.9 -> 0.95) then fell to 0.5: forgetting counts from the peak 0.95
    m = continual_metrics([[0.9], [0.95, 0.8], [0.5, 0.8, 0.7]])
    assert m["forgetting"] == pytest.approx(((0.95 - 0.5) + 0.0) / 2)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.8 - 0.8)) / 2)


def test_fwt_needs_the_pre_training_entries() -> None:
    # R[l][l+1] = score on the next task before training it; zero-shot baseline b given explicitly
    full = [[0.9, 0.3, 0.2], [0.7, 0.8, 0.4], [0.6, 0.5, 0.95]]
    m = continual_metrics(full, zero_shot=[0.1, 0.25, 0.3])
    assert m["fwt"] == pytest.approx(((0.3 - 0.25) + (0.4 - 0.3)) / 2)
    with pytest.raises(ValueError, match=r"R\[1\]\[2\] is NaN"):
        continual_metrics(R, zero_shot=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="zero_shot has 2 entries"):
        continual_metrics(full, zero_shot=[0.1, 0.2])


def test_single_task_and_bad_input() -> None:
    assert continual_metrics([[0.4]]) == {"acc": 0.4, "aaa": 0.4, "forgetting": 0.0, "bwt": 0.0}
    with pytest.raises(ValueError, match="empty"):
        continual_metrics([])
    with pytest.raises(ValueError, match=r"R\[2\]\[2\] is missing"):
        continual_metrics([[0.4], [0.3]])
