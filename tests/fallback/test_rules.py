"""Tests for the pure logic of utils/fallback/rules.py against hand-computed truth: the three float-fallback rules
(skip-layers, quant-boundary with the seed's inclusive indices, the target-drop search with its revert pass)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from utils.errors import InputError
from utils.fallback.rules import (
    check_ranking,
    choose_float_layers,
    quant_boundary_layers,
    search_target_drop,
    skip_most_sensitive,
)

ORDER = ["a", "b", "c", "d", "e"]  # most -> least sensitive


# ---------------------------------------------------------------------------------------------- check_ranking
def test_check_ranking_unknown_layer():
    with pytest.raises(InputError, match="'zz'") as exc:
        check_ranking(["a", "zz", "b"], ["a", "b", "c"], source="s.txt")
    assert "s.txt" in str(exc.value) and "1 layer(s)" in str(exc.value)


def test_check_ranking_missing_layers_only_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.fallback.rules"):
        check_ranking(["b"], ["a", "b", "c"], source="s.txt")
    warnings = [r for r in caplog.records if r.name == "utils.fallback.rules" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 quantized layer(s)" in warnings[0].getMessage() and "s.txt" in warnings[0].getMessage()
    assert "(e.g. a)" in warnings[0].getMessage()


def test_check_ranking_complete_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.fallback.rules"):
        check_ranking(["c", "a", "b"], ["a", "b", "c"])
    assert not [r for r in caplog.records if r.name == "utils.fallback.rules"]


# ------------------------------------------------------------------------------------ skip / quant-boundary
@pytest.mark.parametrize("n, expected", [(0, []), (2, ["a", "b"]), (5, ORDER)])
def test_skip_most_sensitive(n, expected):
    assert skip_most_sensitive(ORDER, n) == expected


@pytest.mark.parametrize("n", [-1, 6])
def test_skip_most_sensitive_out_of_range(n):
    with pytest.raises(InputError, match=f"--skip-layers {n} is out of range"):
        skip_most_sensitive(ORDER, n)


MODEL = ["a", "b", "c", "d", "e", "f"]  # f is not ranked


@pytest.mark.parametrize("k, expected", [
    (0, ["a", "b", "c", "d", "f"]),  # only e (index 0 of least -> most) is INT8
    (1, ["a", "b", "c", "f"]),  # e, d INT8
    (4, ["f"]),  # every ranked layer INT8; the unranked one stays float
])
def test_quant_boundary_layers(k, expected):
    assert quant_boundary_layers(ORDER, k, MODEL) == expected


def test_quant_boundary_layers_model_order():
    # float layers come back in model order, not ranking order
    assert quant_boundary_layers(["c", "a", "b"], 0, ["a", "b", "c"]) == ["a", "c"]


@pytest.mark.parametrize("k", [-1, 5])
def test_quant_boundary_layers_out_of_range(k):
    with pytest.raises(InputError, match=rf"--quant-boundary {k} is out of range.*0\.\.4"):
        quant_boundary_layers(ORDER, k, MODEL)


# ----------------------------------------------------------------------------------------- target-drop search
# Dyadic numbers only: every sum and difference below is exact in binary floating point.
FP_MAP = 0.5


PTQ_MAP = 0.375  # full PTQ: drop 0.125


# mAP recovered by each layer in float (additive). "a" is ranked most sensitive but recovers little,
# so the revert pass gives it back to INT8.
RECOVERY = {"a": 0.0078125, "b": 0.0625, "c": 0.03125, "d": 0.00390625, "e": 0.00390625}


TARGET = 0.03125


class FakeMeasure:
    """mAP = PTQ mAP + the recovery of every float layer; remembers every float set it was asked about."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, float_layers: list[str]) -> float:
        self.calls.append(list(float_layers))
        return PTQ_MAP + sum(RECOVERY[name] for name in float_layers)


def _steps(result):
    return [(s["action"], s["layer"], s["map"], s["drop"], s["float_layers"]) for s in result["steps"]]


def test_search_target_drop_steps_and_revert():
    measure, seen = FakeMeasure(), []
    result = search_target_drop(ORDER, measure, FP_MAP, TARGET, on_step=seen.append)
    assert _steps(result) == [
        ("ptq", None, 0.375, 0.125, 0),
        ("add", "a", 0.3828125, 0.1171875, 1),
        ("add", "b", 0.4453125, 0.0546875, 2),
        ("add", "c", 0.4765625, 0.0234375, 3),  # drop <= 0.03125: stop adding
        ("keep-float", "c", 0.4453125, 0.0546875, 3),  # without c: 0.0547 > target
        ("keep-float", "b", 0.4140625, 0.0859375, 3),  # without b: 0.0859 > target
        ("requantize", "a", 0.46875, 0.03125, 2),  # without a: 0.03125 == target, allowed
    ]
    assert result["float_layers"] == ["b", "c"]
    assert result["map"] == 0.46875 and result["drop"] == 0.03125
    assert measure.calls == [[], ["a"], ["a", "b"], ["a", "b", "c"], ["a", "b"], ["a", "c"], ["b", "c"]]
    assert seen == result["steps"]


def test_search_target_drop_without_revert():
    measure = FakeMeasure()
    result = search_target_drop(ORDER, measure, FP_MAP, TARGET, revert=False)
    assert [s[:2] for s in _steps(result)] == [("ptq", None), ("add", "a"), ("add", "b"), ("add", "c")]
    assert result["float_layers"] == ["a", "b", "c"]
    assert result["map"] == 0.4765625 and result["drop"] == 0.0234375
    assert len(measure.calls) == 4


def test_search_target_drop_revert_keeps_needed_layers():
    # target 0.0625: adding a, b gives drop 0.0546875 and stops; without b the drop would be 0.1171875 > 0.0625,
    # so b stays float; without a it is 0.0625 <= 0.0625, so a goes back to INT8.
    result = search_target_drop(ORDER, FakeMeasure(), FP_MAP, 0.0625)
    assert [s[:2] for s in _steps(result)] == [("ptq", None), ("add", "a"), ("add", "b"),
                                               ("keep-float", "b"), ("requantize", "a")]
    assert result["float_layers"] == ["b"] and result["drop"] == 0.0625


def test_search_target_drop_target_met_by_full_ptq():
    measure, seen = FakeMeasure(), []
    result = search_target_drop(ORDER, measure, FP_MAP, 0.125, on_step=seen.append)
    assert result["float_layers"] == [] and result["map"] == PTQ_MAP and result["drop"] == 0.125
    assert _steps(result) == [("ptq", None, 0.375, 0.125, 0)] and seen == result["steps"]
    assert measure.calls == [[]]


def test_search_target_drop_unreachable_with_max_float():
    seen = []
    with pytest.raises(InputError, match="not reachable with at most 2 float layers") as exc:
        search_target_drop(ORDER, FakeMeasure(), FP_MAP, TARGET, max_float=2, on_step=seen.append)
    # best reached: a and b in float, drop 0.0546875, mAP 0.4453125
    assert "best drop was 0.0547 (mAP 0.4453) with 2 float layers" in str(exc.value)
    assert [s["action"] for s in seen] == ["ptq", "add", "add"]


def test_search_target_drop_unreachable_with_whole_ranking():
    # all five in float recover 0.109375 of the 0.125 drop: 0.015625 is the best
    with pytest.raises(InputError, match="at most 5 float layers: the best drop was 0.0156"):
        search_target_drop(ORDER, FakeMeasure(), FP_MAP, 0.01)
    with pytest.raises(InputError, match="at most 5 float layers"):  # max_float above the ranking is capped
        search_target_drop(ORDER, FakeMeasure(), FP_MAP, 0.01, max_float=99)


def test_search_target_drop_negative_target():
    measure = FakeMeasure()
    with pytest.raises(InputError, match="--target-drop must be >= 0, got -0.1"):
        search_target_drop(ORDER, measure, FP_MAP, -0.1)
    assert measure.calls == []


# ------------------------------------------------------------------------------------------ choose_float_layers
STAND_IN = SimpleNamespace(layers=MODEL)  # skip/boundary only read .layers


@pytest.mark.parametrize("rules", [{}, {"skip_layers": 1, "quant_boundary": 1},
                                   {"skip_layers": 0, "target_drop": 0.1},
                                   {"skip_layers": 1, "quant_boundary": 1, "target_drop": 0.1}])
def test_choose_float_layers_needs_one_rule(rules):
    with pytest.raises(InputError, match="one way"):
        choose_float_layers(STAND_IN, ORDER, measure=FakeMeasure(), fp_map=FP_MAP, **rules)


def test_choose_float_layers_skip_and_boundary():
    assert choose_float_layers(STAND_IN, ORDER, skip_layers=2) == {"rule": "skip-layers 2",
                                                                   "float_layers": ["a", "b"]}
    assert choose_float_layers(STAND_IN, ORDER, quant_boundary=1) == {"rule": "quant-boundary 1",
                                                                      "float_layers": ["a", "b", "c", "f"]}
    with pytest.raises(InputError, match="--skip-layers 6"):
        choose_float_layers(STAND_IN, ORDER, skip_layers=6)


def test_choose_float_layers_target_drop():
    seen = []
    choice = choose_float_layers(STAND_IN, ORDER, target_drop=TARGET, measure=FakeMeasure(), fp_map=FP_MAP,
                                 on_step=seen.append)
    assert choice["rule"] == "target-drop 0.03125"
    assert choice["float_layers"] == ["b", "c"] and choice["drop"] == 0.03125 and len(choice["steps"]) == 7
    assert seen == choice["steps"]
    choice = choose_float_layers(STAND_IN, ORDER, target_drop=TARGET, measure=FakeMeasure(), fp_map=FP_MAP,
                                 revert=False)
    assert choice["float_layers"] == ["a", "b", "c"]
    with pytest.raises(InputError, match="at most 1 float layers"):
        choose_float_layers(STAND_IN, ORDER, target_drop=TARGET, measure=FakeMeasure(), fp_map=FP_MAP,
                            max_float=1)
    with pytest.raises(ValueError, match="measure"):
        choose_float_layers(STAND_IN, ORDER, target_drop=TARGET)
