"""Tests for the pure logic of utils/partial.py against hand-computed truth: reading rankings (YOLOv6's seed text
file, our proxy text files, our JSON report), the three float-fallback rules (skip-layers, quant-boundary with the
seed's inclusive indices, the target-drop search with its revert pass) and the printed tables. No model, no data."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from utils import partial
from utils import sensitivity as sens
from utils.errors import InputError

ORDER = ["a", "b", "c", "d", "e"]  # most -> least sensitive


# ----------------------------------------------------------------------------------------------- read_ranking
def test_read_ranking_seed_text_ranks_by_map50_95(tmp_path):
    # YOLOv6's file: "<layer> <mAP50> <mAP50:95>", no header; a higher mAP means less sensitive.
    # By mAP50:95 (ascending): x 0.30, z 0.35, y 0.40; by mAP50 it would be y 0.50, z 0.55, x 0.60.
    path = tmp_path / "yolov6s_sens.txt"
    path.write_text("x 0.6000 0.3000\ny 0.5000 0.4000\nz 0.5500 0.3500\n")
    assert partial.read_ranking(path) == ["x", "z", "y"]
    assert partial.read_ranking(str(path)) == ["x", "z", "y"]


def test_read_ranking_seed_text_ties_keep_file_order(tmp_path):
    path = tmp_path / "seed.txt"
    path.write_text("p 0.5 0.3\nq 0.4 0.2\nr 0.6 0.3\n")
    assert partial.read_ranking(path) == ["q", "p", "r"]


def test_read_ranking_sqnr_text(tmp_path):
    # higher sqnr_db = less sensitive; ranked by sqnr_db (second value), not by sqnr_db_neck
    rows = [{"name": "x", "sqnr_db_neck": 10.0, "sqnr_db": 30.0},
            {"name": "y", "sqnr_db_neck": 20.0, "sqnr_db": 15.0},
            {"name": "z", "sqnr_db_neck": 30.0, "sqnr_db": 22.5}]
    path = tmp_path / "sens_sqnr.txt"
    path.write_text(sens.format_sensitivity(rows, "sqnr"))
    assert path.read_text().startswith("# metric: sqnr_db ")
    assert partial.read_ranking(path) == ["y", "z", "x"]  # by the neck column it would be x, y, z


def test_read_ranking_mse_text(tmp_path):
    # lower mse = less sensitive: the largest mse comes first; ranked by mse, not by mse_neck
    rows = [{"name": "x", "mse_neck": 3e-3, "mse": 1e-4},
            {"name": "y", "mse_neck": 1e-3, "mse": 5e-2},
            {"name": "z", "mse_neck": 2e-3, "mse": 2e-3}]
    path = tmp_path / "sens_mse.txt"
    path.write_text(sens.format_sensitivity(rows, "mse"))
    assert path.read_text().startswith("# metric: mse ")
    assert partial.read_ranking(path) == ["y", "z", "x"]  # by mse_neck it would be x, z, y


def test_read_ranking_json_sorted_by_rank(tmp_path):
    report = {"method": "sqnr", "metric": "sqnr_db",
              "layers": [{"name": "x", "rank": 3, "sqnr_db": 30.0}, {"name": "y", "rank": 1, "sqnr_db": 10.0},
                         {"name": "z", "rank": 2, "sqnr_db": 20.0}]}
    path = tmp_path / "sens_sqnr.json"
    path.write_text(json.dumps(report))
    assert partial.read_ranking(path) == ["y", "z", "x"]


@pytest.mark.parametrize("name, text, match", [
    ("no_layers.json", json.dumps({"method": "map"}), "not a sensitivity report"),
    ("no_rank.json", json.dumps({"layers": [{"name": "x"}]}), "not a sensitivity report"),
    ("list.json", json.dumps([1, 2]), "not a sensitivity report"),
    ("broken.json", "{", "not a sensitivity report"),
    ("empty.json", "", "not a sensitivity report"),
    ("empty_layers.json", json.dumps({"layers": []}), "lists no layers"),
    ("empty.txt", "", "lists no layers"),
    ("header_only.txt", "# metric: sqnr_db (higher = less sensitive)\n", "lists no layers"),
    ("dup.txt", "x 0.5 0.3\ny 0.5 0.2\nx 0.4 0.1\n", "'x' more than once"),
    ("dup.json", json.dumps({"layers": [{"name": "x", "rank": 1}, {"name": "x", "rank": 2}]}), "'x' more than once"),
    ("short_line.txt", "x 0.5 0.3\ny 0.5\n", "line 2"),
    ("not_number.txt", "x 0.5 0.3\n\ny 0.5 high\n", "line 3"),
    ("unknown_metric.txt", "# metric: accuracy\nx 0.5 0.3\n", "unknown metric 'accuracy'"),
])
def test_read_ranking_errors(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=match) as exc:
        partial.read_ranking(path)
    assert name in str(exc.value)


def test_read_ranking_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="not found") as exc:
        partial.read_ranking(path)
    assert "nope.txt" in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        partial.read_ranking(tmp_path)  # a folder is not a file


# ---------------------------------------------------------------------------------------------- check_ranking
def test_check_ranking_unknown_layer():
    with pytest.raises(InputError, match="'zz'") as exc:
        partial.check_ranking(["a", "zz", "b"], ["a", "b", "c"], source="s.txt")
    assert "s.txt" in str(exc.value) and "1 layer(s)" in str(exc.value)


def test_check_ranking_missing_layers_only_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.partial"):
        partial.check_ranking(["b"], ["a", "b", "c"], source="s.txt")
    warnings = [r for r in caplog.records if r.name == "utils.partial" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 quantized layer(s)" in warnings[0].getMessage() and "s.txt" in warnings[0].getMessage()
    assert "(e.g. a)" in warnings[0].getMessage()


def test_check_ranking_complete_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.partial"):
        partial.check_ranking(["c", "a", "b"], ["a", "b", "c"])
    assert not [r for r in caplog.records if r.name == "utils.partial"]


# ------------------------------------------------------------------------------------ skip / quant-boundary
@pytest.mark.parametrize("n, expected", [(0, []), (2, ["a", "b"]), (5, ORDER)])
def test_skip_most_sensitive(n, expected):
    assert partial.skip_most_sensitive(ORDER, n) == expected


@pytest.mark.parametrize("n", [-1, 6])
def test_skip_most_sensitive_out_of_range(n):
    with pytest.raises(InputError, match=f"--skip-layers {n} is out of range"):
        partial.skip_most_sensitive(ORDER, n)


MODEL = ["a", "b", "c", "d", "e", "f"]  # f is not ranked


@pytest.mark.parametrize("k, expected", [
    (0, ["a", "b", "c", "d", "f"]),  # only e (index 0 of least -> most) is INT8
    (1, ["a", "b", "c", "f"]),  # e, d INT8
    (4, ["f"]),  # every ranked layer INT8; the unranked one stays float
])
def test_quant_boundary_layers(k, expected):
    assert partial.quant_boundary_layers(ORDER, k, MODEL) == expected


def test_quant_boundary_layers_model_order():
    # float layers come back in model order, not ranking order
    assert partial.quant_boundary_layers(["c", "a", "b"], 0, ["a", "b", "c"]) == ["a", "c"]


@pytest.mark.parametrize("k", [-1, 5])
def test_quant_boundary_layers_out_of_range(k):
    with pytest.raises(InputError, match=rf"--quant-boundary {k} is out of range.*0\.\.4"):
        partial.quant_boundary_layers(ORDER, k, MODEL)


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
    result = partial.search_target_drop(ORDER, measure, FP_MAP, TARGET, on_step=seen.append)
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
    result = partial.search_target_drop(ORDER, measure, FP_MAP, TARGET, revert=False)
    assert [s[:2] for s in _steps(result)] == [("ptq", None), ("add", "a"), ("add", "b"), ("add", "c")]
    assert result["float_layers"] == ["a", "b", "c"]
    assert result["map"] == 0.4765625 and result["drop"] == 0.0234375
    assert len(measure.calls) == 4


def test_search_target_drop_revert_keeps_needed_layers():
    # target 0.0625: adding a, b gives drop 0.0546875 and stops; without b the drop would be 0.1171875 > 0.0625,
    # so b stays float; without a it is 0.0625 <= 0.0625, so a goes back to INT8.
    result = partial.search_target_drop(ORDER, FakeMeasure(), FP_MAP, 0.0625)
    assert [s[:2] for s in _steps(result)] == [("ptq", None), ("add", "a"), ("add", "b"),
                                               ("keep-float", "b"), ("requantize", "a")]
    assert result["float_layers"] == ["b"] and result["drop"] == 0.0625


def test_search_target_drop_target_met_by_full_ptq():
    measure, seen = FakeMeasure(), []
    result = partial.search_target_drop(ORDER, measure, FP_MAP, 0.125, on_step=seen.append)
    assert result["float_layers"] == [] and result["map"] == PTQ_MAP and result["drop"] == 0.125
    assert _steps(result) == [("ptq", None, 0.375, 0.125, 0)] and seen == result["steps"]
    assert measure.calls == [[]]


def test_search_target_drop_unreachable_with_max_float():
    seen = []
    with pytest.raises(InputError, match="not reachable with at most 2 float layers") as exc:
        partial.search_target_drop(ORDER, FakeMeasure(), FP_MAP, TARGET, max_float=2, on_step=seen.append)
    # best reached: a and b in float, drop 0.0546875, mAP 0.4453125
    assert "best drop was 0.0547 (mAP 0.4453) with 2 float layers" in str(exc.value)
    assert [s["action"] for s in seen] == ["ptq", "add", "add"]


def test_search_target_drop_unreachable_with_whole_ranking():
    # all five in float recover 0.109375 of the 0.125 drop: 0.015625 is the best
    with pytest.raises(InputError, match="at most 5 float layers: the best drop was 0.0156"):
        partial.search_target_drop(ORDER, FakeMeasure(), FP_MAP, 0.01)
    with pytest.raises(InputError, match="at most 5 float layers"):  # max_float above the ranking is capped
        partial.search_target_drop(ORDER, FakeMeasure(), FP_MAP, 0.01, max_float=99)


def test_search_target_drop_negative_target():
    measure = FakeMeasure()
    with pytest.raises(InputError, match="--target-drop must be >= 0, got -0.1"):
        partial.search_target_drop(ORDER, measure, FP_MAP, -0.1)
    assert measure.calls == []


# ------------------------------------------------------------------------------------------ choose_float_layers
STAND_IN = SimpleNamespace(layers=MODEL)  # skip/boundary only read .layers


@pytest.mark.parametrize("rules", [{}, {"skip_layers": 1, "quant_boundary": 1},
                                   {"skip_layers": 0, "target_drop": 0.1},
                                   {"skip_layers": 1, "quant_boundary": 1, "target_drop": 0.1}])
def test_choose_float_layers_needs_one_rule(rules):
    with pytest.raises(InputError, match="one way"):
        partial.choose_float_layers(STAND_IN, ORDER, measure=FakeMeasure(), fp_map=FP_MAP, **rules)


def test_choose_float_layers_skip_and_boundary():
    assert partial.choose_float_layers(STAND_IN, ORDER, skip_layers=2) == {"rule": "skip-layers 2",
                                                                          "float_layers": ["a", "b"]}
    assert partial.choose_float_layers(STAND_IN, ORDER, quant_boundary=1) == {"rule": "quant-boundary 1",
                                                                             "float_layers": ["a", "b", "c", "f"]}
    with pytest.raises(InputError, match="--skip-layers 6"):
        partial.choose_float_layers(STAND_IN, ORDER, skip_layers=6)


def test_choose_float_layers_target_drop():
    seen = []
    choice = partial.choose_float_layers(STAND_IN, ORDER, target_drop=TARGET, measure=FakeMeasure(), fp_map=FP_MAP,
                                         on_step=seen.append)
    assert choice["rule"] == "target-drop 0.03125"
    assert choice["float_layers"] == ["b", "c"] and choice["drop"] == 0.03125 and len(choice["steps"]) == 7
    assert seen == choice["steps"]
    choice = partial.choose_float_layers(STAND_IN, ORDER, target_drop=TARGET, measure=FakeMeasure(), fp_map=FP_MAP,
                                         revert=False)
    assert choice["float_layers"] == ["a", "b", "c"]
    with pytest.raises(InputError, match="at most 1 float layers"):
        partial.choose_float_layers(STAND_IN, ORDER, target_drop=TARGET, measure=FakeMeasure(), fp_map=FP_MAP,
                                    max_float=1)
    with pytest.raises(ValueError, match="measure"):
        partial.choose_float_layers(STAND_IN, ORDER, target_drop=TARGET)


# ------------------------------------------------------------------------------------------------- formatting
def test_format_steps():
    result = partial.search_target_drop(ORDER, FakeMeasure(), FP_MAP, TARGET)
    lines = partial.format_steps(result["steps"]).splitlines()
    assert len(lines) == 8
    assert lines[0].split() == ["step", "action", "mAP50:95", "drop", "float", "layer"]
    assert lines[1].split() == ["0", "ptq", "0.3750", "0.1250", "0", "-"]
    assert lines[2].split() == ["1", "add", "0.3828", "0.1172", "1", "a"]
    assert lines[4].split() == ["3", "add", "0.4766", "0.0234", "3", "c"]
    assert lines[6].split() == ["5", "keep-float", "0.4141", "0.0859", "3", "b"]
    assert lines[7].split()[:2] == ["6", "requantize"] and lines[7].split()[-1] == "a"


def _report(**extra):
    report = {"fp_map": 0.4521, "ptq_map": 0.4012, "partial_map": 0.4489, "int8_layers": 70, "total_layers": 72,
              "float_layers": ["detect.reg_preds.0", "backbone.stem.rbr_reparam"], "rule": "skip-layers 2",
              "steps": []}
    report.update(extra)
    return report


def test_format_summary_without_onnx():
    text = partial.format_summary(_report())
    assert "step" not in text.splitlines()[0]  # no steps table for skip-layers
    assert "0.4521" in text and "0.4012" in text and "0.4489" in text
    assert "0.0509" in text and "0.0032" in text  # the drops
    assert "INT8 layers 70/72 (skip-layers 2); float: detect.reg_preds.0, backbone.stem.rbr_reparam" in text
    assert "ONNX" not in text and "TensorRT" not in text
    assert "float: none" in partial.format_summary(_report(float_layers=[], int8_layers=72, rule="skip-layers 0"))


def test_format_summary_with_steps_and_onnx():
    steps = partial.search_target_drop(ORDER, FakeMeasure(), FP_MAP, TARGET)["steps"]
    text = partial.format_summary(_report(steps=steps, rule="target-drop 0.03125", onnx_map=0.4476,
                                          onnx="runs/partial/model_partial.onnx", onnx_max_abs_diff=1.5e-5,
                                          build="bash build_engine.sh runs/partial/model_partial.onnx"))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["step", "action"] and "requantize" in text
    assert any(line.startswith("partial Q/DQ ONNX (ORT)") and line.split()[-2:] == ["0.4476", "0.0045"]
               for line in lines)
    assert "INT8 layers 70/72 (target-drop 0.03125)" in text
    assert "ONNX: runs/partial/model_partial.onnx (max |ORT - PyTorch| 1.5e-05)" in text
    assert lines[-1] == ("build the TensorRT engine on a GPU machine: "
                         "bash build_engine.sh runs/partial/model_partial.onnx")
