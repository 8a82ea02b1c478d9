"""Tests for tools/demo_summary.py: the summary of make demo names the methods the run used."""
from __future__ import annotations

import json

import pytest

from tests.helpers import load_script

REPORT = {"fp_map": 0.6, "ptq_map": 0.5, "partial_map": 0.58, "onnx_map": 0.579, "onnx_max_abs_diff": 0.01,
          "int8_layers": 70, "total_layers": 72, "float_layers": ["a", "b"], "rule": "target-drop 0.001",
          "onnx": "m.onnx", "build": "./build_engine.sh m.onnx", "seconds": 12.0,
          "calibration": {"method": "auto", "auto": {"selected": "per-layer"}}}


def test_summary_names_calibration_ranking_and_rule(tmp_path, capsys):
    summary = load_script("tools/demo_summary.py")
    ranking = tmp_path / "sensitivity_sqnr_revert.json"
    ranking.write_text(json.dumps({"method": "sqnr", "direction": "revert", "layers": []}))
    report = tmp_path / "partial_quant.json"
    report.write_text(json.dumps({**REPORT, "args": {"sensitivity_file": str(ranking)}}))
    out = summary.main(summary.get_args_parser().parse_args(["--partial-report", str(report), "--output",
                                                             str(tmp_path / "s.json")]))
    assert out["methods"] == {"calibration": "auto", "calibration_auto": "per-layer", "fallback": "target-drop 0.001",
                              "ranking": f"sqnr (revert): {ranking}"}
    assert out["onnx_vs_pytorch_map"] == pytest.approx(-0.001) and "calibration: auto" in capsys.readouterr().out
    report.write_text(json.dumps({**REPORT, "args": {"rerank": "mse"}}))
    out = summary.main(summary.get_args_parser().parse_args(["--partial-report", str(report), "--output",
                                                             str(tmp_path / "s.json")]))
    assert out["methods"]["ranking"] == "re-ranked during the search by mse (revert direction)"
