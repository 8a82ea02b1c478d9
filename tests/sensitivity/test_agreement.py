"""Tests for utils/sensitivity/agreement.py: Spearman's rho with ties, top-k overlap, ranking direction."""
from __future__ import annotations

import math

import pytest

from utils.sensitivity.agreement import average_ranks, spearman, top_k_overlap
from utils.sensitivity.metrics import (
    sensitivity_order,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spearman_and_overlap():
    assert average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: Pearson of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    assert top_k_overlap(["a", "b", "c"], ["c", "a", "d"], 2) == 1
    assert sensitivity_order([0.3, 0.1, 0.2], "map") == [1, 2, 0]
    assert sensitivity_order([1e-3, 1e-1, 1e-2], "mse") == [1, 2, 0]
