"""Tests for utils/fallback/rerank.py against hand-worked examples: the re-ranked order follows the proxy on the
current partial model, and the search finds the shortest prefix within the budget with few mAP evaluations."""
from __future__ import annotations

import pytest

from utils.errors import InputError
from utils.fallback.rerank import GreedyOrder, search_rerank


class FakeProbe:
    """A revert-direction sqnr probe whose value depends on the float set it starts from (``rebase``)."""

    direction, method = "revert", "sqnr"

    def __init__(self, gains: dict[tuple[str, ...], dict[str, float]]):
        self.gains, self.base, self.calls = gains, [], []

    def rebase(self, layers):
        self.base = list(layers)

    def __call__(self, layer):
        self.calls.append((tuple(self.base), layer))
        return {"sqnr_db": self.gains[tuple(self.base)][layer]}


GAINS = {(): {"x": 10.0, "y": 9.0, "z": 1.0}, ("x",): {"y": 2.0, "z": 8.0}, ("x", "z"): {"y": 5.0},
         ("x", "y"): {"z": 3.0}}


def test_greedy_order_re_ranks_on_the_partial_model():
    probe = FakeProbe(GAINS)
    order = GreedyOrder(probe, ["x", "y", "z"], pool=2)
    assert order.prefix(3) == ["x", "z", "y"]  # a fixed order (by the first scores) would be x, y, z
    assert probe.calls == [((), "x"), ((), "y"), ((), "z"), (("x",), "y"), (("x",), "z"), (("x", "z"), "y")]
    assert order.probes == 6 and order.prefix(2) == ["x", "z"] and len(probe.calls) == 6  # nothing recomputed


def test_lazy_pool_re_scores_only_the_best_by_their_last_score():
    probe = FakeProbe(GAINS)
    order = GreedyOrder(probe, ["x", "y", "z"], pool=1)
    assert order.prefix(2) == ["x", "y"]  # z's stale score (1.0) keeps it out of a pool of one
    assert probe.calls[-1] == (("x",), "y")


class FixedOrder:
    """GreedyOrder's interface over a fixed sequence."""

    def __init__(self, sequence):
        self.layers, self.sequence, self.probes = list(sequence), list(sequence), 0

    def prefix(self, n):
        return self.sequence[:n]


def _measure(needed, calls):
    def measure(float_layers):
        calls.append(list(float_layers))
        return 0.30 - 0.05 * len(set(needed) - set(float_layers))
    return measure


def test_search_finds_the_shortest_prefix_by_doubling_and_bisection():
    calls = []
    result = search_rerank(FixedOrder("abcdefgh"), _measure("abc", calls), fp_map=0.30, target=0.005)
    assert calls[:5] == [[], ["a"], ["a", "b"], list("abcd"), list("abc")]  # 0, 1, 2, 4 float; then 3
    assert result["float_layers"] == ["a", "b", "c"] and result["drop"] == pytest.approx(0.0)
    assert [s["action"] for s in result["steps"]] == ["ptq", "check", "check", "check", "check", "keep-float",
                                                     "keep-float", "keep-float"]
    assert result["evaluations"] == 8 == len(calls)


def test_revert_pass_requantizes_what_the_prefix_did_not_need():
    calls = []
    result = search_rerank(FixedOrder("abcdefgh"), _measure("ace", calls), fp_map=0.30, target=0.005)
    assert result["float_layers"] == ["a", "c", "e"]  # prefix a..e, then b and d return to INT8
    no_revert = search_rerank(FixedOrder("abcdefgh"), _measure("ace", []), 0.30, 0.005, revert=False)
    assert no_revert["float_layers"] == list("abcde")


def test_full_ptq_within_budget_and_unreachable_budget():
    assert search_rerank(FixedOrder("ab"), lambda f: 0.30, 0.30, 0.005)["float_layers"] == []
    with pytest.raises(InputError, match="not reachable with at most 2 float layers"):
        search_rerank(FixedOrder("abcd"), _measure("abcd", []), 0.30, 0.005, max_float=2)
