"""Tests for utils/fallback/report.py: the printed search steps and summary table."""
from __future__ import annotations

from tests.fallback.test_rules import FP_MAP, ORDER, TARGET, FakeMeasure
from utils.fallback.report import format_steps, format_summary
from utils.fallback.rules import (
    search_target_drop,
)


# ------------------------------------------------------------------------------------------------- formatting
def test_format_steps():
    result = search_target_drop(ORDER, FakeMeasure(), FP_MAP, TARGET)
    lines = format_steps(result["steps"]).splitlines()
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
    text = format_summary(_report())
    assert "step" not in text.splitlines()[0]  # no steps table for skip-layers
    assert "0.4521" in text and "0.4012" in text and "0.4489" in text
    assert "0.0509" in text and "0.0032" in text  # the drops
    assert "INT8 layers 70/72 (skip-layers 2); float: detect.reg_preds.0, backbone.stem.rbr_reparam" in text
    assert "ONNX" not in text and "TensorRT" not in text
    assert "float: none" in format_summary(_report(float_layers=[], int8_layers=72, rule="skip-layers 0"))


def test_format_summary_with_steps_and_onnx():
    steps = search_target_drop(ORDER, FakeMeasure(), FP_MAP, TARGET)["steps"]
    text = format_summary(_report(steps=steps, rule="target-drop 0.03125", onnx_map=0.4476,
                                  onnx="runs/partial/model_partial.onnx", onnx_max_abs_diff=1.5e-5,
                                  build="bash build_engine.sh runs/partial/model_partial.onnx"))
    lines = text.splitlines()
    assert lines[0] == "search steps (mAP50:95 on the report set)"
    assert lines[1].split()[:2] == ["step", "action"] and "requantize" in text
    assert any(line.startswith("partial Q/DQ ONNX (ORT)") and line.split()[-2:] == ["0.4476", "0.0045"]
               for line in lines)
    assert "INT8 layers 70/72 (target-drop 0.03125)" in text
    assert "ONNX: runs/partial/model_partial.onnx (max |ORT - PyTorch| 1.5e-05)" in text
    assert lines[-1] == ("build the TensorRT engine on a GPU machine: "
                         "bash build_engine.sh runs/partial/model_partial.onnx")


def test_format_summary_names_the_search_set():
    steps = search_target_drop(ORDER, FakeMeasure(), FP_MAP, TARGET)["steps"]
    search = {"data": "train.json", "images": "coco/train", "num_images": 209, "same_as_report": False}
    text = format_summary(_report(steps=steps, rule="target-drop 0.03125", search=search))
    assert text.splitlines()[0] == "search steps (mAP50:95 on the search set, coco/train (209 images))"
    assert "optimistic" not in text
    same = format_summary(_report(steps=steps, rule="target-drop 0.03125", search={**search, "same_as_report": True}))
    assert "the partial mAP below is optimistic" in same
