"""Tests for read_ranking (utils/sensitivity/report.py) against hand-computed orders: YOLOv6's seed text file,
our proxy text files and our JSON report."""
from __future__ import annotations

import json

import pytest

from utils.errors import InputError
from utils.sensitivity.report import format_sensitivity, read_ranking

ORDER = ["a", "b", "c", "d", "e"]  # most -> least sensitive


# ----------------------------------------------------------------------------------------------- read_ranking
def test_read_ranking_seed_text_ranks_by_map50_95(tmp_path):
    # YOLOv6's file: "<layer> <mAP50> <mAP50:95>", no header; a higher mAP means less sensitive.
    # By mAP50:95 (ascending): x 0.30, z 0.35, y 0.40; by mAP50 it would be y 0.50, z 0.55, x 0.60.
    path = tmp_path / "yolov6s_sens.txt"
    path.write_text("x 0.6000 0.3000\ny 0.5000 0.4000\nz 0.5500 0.3500\n")
    assert read_ranking(path) == ["x", "z", "y"]
    assert read_ranking(str(path)) == ["x", "z", "y"]


def test_read_ranking_seed_text_ties_keep_file_order(tmp_path):
    path = tmp_path / "seed.txt"
    path.write_text("p 0.5 0.3\nq 0.4 0.2\nr 0.6 0.3\n")
    assert read_ranking(path) == ["q", "p", "r"]


def test_read_ranking_sqnr_text(tmp_path):
    # higher sqnr_db = less sensitive; ranked by sqnr_db (second value), not by sqnr_db_neck
    rows = [{"name": "x", "sqnr_db_neck": 10.0, "sqnr_db": 30.0},
            {"name": "y", "sqnr_db_neck": 20.0, "sqnr_db": 15.0},
            {"name": "z", "sqnr_db_neck": 30.0, "sqnr_db": 22.5}]
    path = tmp_path / "sens_sqnr.txt"
    path.write_text(format_sensitivity(rows, "sqnr"))
    assert path.read_text().startswith("# metric: sqnr_db ")
    assert read_ranking(path) == ["y", "z", "x"]  # by the neck column it would be x, y, z


def test_read_ranking_mse_text(tmp_path):
    # lower mse = less sensitive: the largest mse comes first; ranked by mse, not by mse_neck
    rows = [{"name": "x", "mse_neck": 3e-3, "mse": 1e-4},
            {"name": "y", "mse_neck": 1e-3, "mse": 5e-2},
            {"name": "z", "mse_neck": 2e-3, "mse": 2e-3}]
    path = tmp_path / "sens_mse.txt"
    path.write_text(format_sensitivity(rows, "mse"))
    assert path.read_text().startswith("# metric: mse ")
    assert read_ranking(path) == ["y", "z", "x"]  # by mse_neck it would be x, z, y


def test_read_ranking_json_sorted_by_rank(tmp_path):
    report = {"method": "sqnr", "metric": "sqnr_db",
              "layers": [{"name": "x", "rank": 3, "sqnr_db": 30.0}, {"name": "y", "rank": 1, "sqnr_db": 10.0},
                         {"name": "z", "rank": 2, "sqnr_db": 20.0}]}
    path = tmp_path / "sens_sqnr.json"
    path.write_text(json.dumps(report))
    assert read_ranking(path) == ["y", "z", "x"]


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
        read_ranking(path)
    assert name in str(exc.value)


def test_read_ranking_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="not found") as exc:
        read_ranking(path)
    assert "nope.txt" in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        read_ranking(tmp_path)  # a folder is not a file


def test_read_ranking_revert_text_reads_the_metric_the_other_way(tmp_path):
    # revert: the value is the model with only this layer back in float, so a *higher* sqnr / mAP = more sensitive
    rows = [{"name": "x", "sqnr_db_neck": 10.0, "sqnr_db": 30.0},
            {"name": "y", "sqnr_db_neck": 20.0, "sqnr_db": 15.0},
            {"name": "z", "sqnr_db_neck": 30.0, "sqnr_db": 22.5}]
    path = tmp_path / "sens_sqnr_revert.txt"
    path.write_text(format_sensitivity(rows, "sqnr", "revert"))
    assert read_ranking(path) == ["x", "z", "y"]
    maps = [{"name": "x", "mAP50": 0.5, "mAP50_95": 0.30}, {"name": "y", "mAP50": 0.4, "mAP50_95": 0.32}]
    path = tmp_path / "sens_map_revert.txt"
    path.write_text(format_sensitivity(maps, "map", "revert"))
    assert path.read_text().startswith("# metric: mAP50_95 ") and read_ranking(path) == ["y", "x"]
    path.write_text(path.read_text().replace("direction: revert", "direction: sideways"))
    with pytest.raises(InputError, match="unknown direction 'sideways'"):
        read_ranking(path)
