"""Tests of utils.inference.coco_eval on a tiny in-memory COCO dataset with hand-computable metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from utils.data.coco import load_coco
from utils.errors import InputError
from utils.inference.coco_eval import METRIC_NAMES, CocoEvaluator

CAT_IDS = [1, 90]  # non-contiguous: class 0 -> 1, class 1 -> 90

# (image_id, category_id, [x, y, w, h]): one small, one medium and one large box.
GT_BOXES = [
    (10, 1, [10.0, 10.0, 40.0, 40.0]),  # area 1600: medium
    (20, 90, [100.0, 100.0, 100.0, 100.0]),  # area 10000: large
    (20, 1, [5.0, 5.0, 20.0, 20.0]),  # area 400: small
]


def _dataset() -> dict:
    return {
        "images": [
            {"id": 10, "width": 640, "height": 480, "file_name": "a.jpg"},
            {"id": 20, "width": 640, "height": 480, "file_name": "b.jpg"},
        ],
        "annotations": [
            {"id": i + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for i, (img, cat, box) in enumerate(GT_BOXES)
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}],
    }


@pytest.fixture
def coco_gt(tmp_path: Path) -> COCO:
    path = tmp_path / "instances_tiny.json"
    path.write_text(json.dumps(_dataset()))
    return load_coco(path)


def _detections(image_id: int, dx_fraction: float = 0.0, class_map: dict[int, int] | None = None) -> torch.Tensor:
    """GT boxes of one image as [n, 6] detections, shifted right by dx_fraction of their width."""
    class_map = class_map or {1: 0, 90: 1}
    rows = []
    for img, cat, (x, y, w, h) in GT_BOXES:
        if img == image_id:
            x += dx_fraction * w
            rows.append([x, y, x + w, y + h, 0.9, class_map[cat]])
    return torch.tensor(rows)


def _evaluate(coco_gt: COCO, **kwargs) -> dict:
    evaluator = CocoEvaluator(coco_gt, CAT_IDS)
    for image_id in (10, 20):
        evaluator.update(image_id, _detections(image_id, **kwargs))
    return evaluator.summarize()


def test_perfect_predictions(coco_gt: COCO, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = _evaluate(coco_gt)
    for name in METRIC_NAMES:
        assert metrics[name] == pytest.approx(1.0), name
    lines = metrics["summary_text"].splitlines()
    assert len(lines) == 12
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured


def test_shifted_boxes_known_iou(coco_gt: COCO) -> None:
    # Shifting by w/5: intersection 0.8 wh, union 1.2 wh, IoU 2/3: matched at IoU 0.50 .. 0.65 (4 of 10 thresholds).
    metrics = _evaluate(coco_gt, dx_fraction=0.2)
    assert metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["mAP75"] == pytest.approx(0.0)
    assert metrics["mAP50_95"] == pytest.approx(0.4)


def test_wrong_class_scores_zero(coco_gt: COCO) -> None:
    metrics = _evaluate(coco_gt, class_map={1: 1, 90: 0})
    assert metrics["mAP50_95"] == 0.0
    assert metrics["mAP50"] == 0.0
    assert metrics["AR100"] == 0.0


def test_no_detections_gives_zeros(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt, CAT_IDS)
    evaluator.update(10, torch.zeros(0, 6))
    metrics = evaluator.summarize()
    assert all(metrics[name] == 0.0 for name in METRIC_NAMES)
    assert "No detections" in metrics["summary_text"]
    assert CocoEvaluator(coco_gt, CAT_IDS).summarize()["mAP50"] == 0.0  # nothing updated at all


def test_subset_only_counts_updated_images(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt, CAT_IDS)
    evaluator.update(10, _detections(10))
    metrics = evaluator.summarize()
    # Image 20's two ground-truth boxes would be missed (recall 1/3) if it were evaluated.
    assert metrics["mAP50_95"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)
    assert evaluator.image_ids == [10]


def test_result_format_and_save_json_round_trip(coco_gt: COCO, tmp_path: Path) -> None:
    evaluator = CocoEvaluator(coco_gt, CAT_IDS)
    evaluator.update(20, torch.tensor([[10.12345, 20.5, 30.0, 40.0004, 0.123456789, 1.0]]))
    (pred,) = evaluator.predictions
    assert pred["image_id"] == 20 and pred["category_id"] == 90 and pred["score"] == 0.12346
    assert pred["bbox"] == pytest.approx([10.123, 20.5, 19.877, 19.5], abs=1e-9)
    evaluator.summarize()
    assert set(evaluator.predictions[0]) == {"image_id", "category_id", "bbox", "score"}  # not touched by loadRes
    out = tmp_path / "results" / "predictions.json"
    evaluator.save_json(out)
    assert json.loads(out.read_text()) == evaluator.predictions
    assert [p.name for p in out.parent.iterdir()] == ["predictions.json"]  # no temp file left behind


def test_update_validation(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt, CAT_IDS)
    with pytest.raises(InputError, match="class index 2 has no category"):
        evaluator.update(10, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.5, 2.0]]))
    with pytest.raises(InputError, match="image id 99 is not in the annotation file"):
        evaluator.update(99, torch.zeros(0, 6))
    with pytest.raises(InputError, match=r"expected \[n, 6\]"):
        evaluator.update(10, torch.zeros(3, 5))
    with pytest.raises(InputError, match=r"category ids \[3\] are not in the annotation file"):
        CocoEvaluator(coco_gt, [1, 3])
