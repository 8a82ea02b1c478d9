"""Agreement between two sensitivity rankings (a proxy against ``map``, one half of the images against the other)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from utils.sensitivity.metrics import higher_is_less_sensitive


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` (ascending), tied values sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (0 when either side is constant)."""
    if len(a) != len(b):
        raise ValueError(f"sequences differ in length: {len(a)} vs {len(b)}")
    if len(a) < 2:
        return 0.0
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def sensitivity_scores(values: Sequence[float], method: str, direction: str = "single") -> list[float]:
    """Values turned so that larger = more sensitive, for comparing methods and directions."""
    return [-v for v in values] if higher_is_less_sensitive(method, direction) else list(values)


def top_k_overlap(order_a: Sequence[Any], order_b: Sequence[Any], k: int) -> int:
    """How many of the first ``k`` of one ranking are among the first ``k`` of the other."""
    return len(set(order_a[:k]) & set(order_b[:k]))
