"""Tests for utils/sensitivity/report.py: the seed's text format round-trips and proxy files carry their metric."""
from __future__ import annotations

import pytest

from utils.errors import InputError
from utils.sensitivity.report import format_sensitivity, parse_sensitivity, read_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ format and CLI
def test_seed_text_format_round_trip(tmp_path):
    rows = [{"name": "backbone.stem.rbr_reparam", "mAP50": 0.61234, "mAP50_95": 0.412345},
            {"name": "detect.cls_preds.0", "mAP50": 0.5, "mAP50_95": 0.3}]
    text = format_sensitivity(rows, "map")
    assert text == "backbone.stem.rbr_reparam 0.6123 0.4123\ndetect.cls_preds.0 0.5000 0.3000\n"
    for line in text.splitlines(keepends=True):  # YOLOv6's quant_sensitivity_load
        layer, map50, map50_95 = line.strip("\n").split(" ")
        assert float(map50) >= 0 and float(map50_95) >= 0
    parsed, metric = parse_sensitivity(text)
    assert metric == "mAP50_95" and parsed == [("backbone.stem.rbr_reparam", 0.6123, 0.4123),
                                               ("detect.cls_preds.0", 0.5, 0.3)]
    proxy = format_sensitivity([{"name": "a.b", "sqnr_db_neck": 31.5, "sqnr_db": 20.25}], "sqnr")
    assert proxy.startswith("# metric: sqnr_db (higher = less sensitive")
    path = tmp_path / "s.txt"
    path.write_text(proxy)
    assert read_sensitivity(path) == ([("a.b", 31.5, 20.25)], "sqnr_db")
    path.write_text("a.b 0.1\n")
    with pytest.raises(InputError, match="line 1"):
        read_sensitivity(path)
