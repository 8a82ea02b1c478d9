"""Small pycocotools wrapper: accumulate per-image detections, then compute the 12 COCO bbox metrics."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.errors import InputError
from utils.fileio import atomic_write_text
from utils.inference.bootstrap import ImageMatches

_logger = logging.getLogger(__name__)

# Names of COCOeval.stats, in its order.
METRIC_NAMES = (
    "mAP50_95",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)

class CocoEvaluator:
    """Collects detections per image and evaluates them with COCOeval (bbox).

    Args:
        coco_gt: ground truth, e.g. from `load_coco`.
        cat_ids: category id of each class index (class index i -> cat_ids[i]); None for a class the dataset does
            not have (its detections are left out).
    """

    def __init__(self, coco_gt: COCO, cat_ids: list[int | None]) -> None:
        if not any(c is not None for c in cat_ids):
            raise InputError("no category ids given; the class index -> COCO category id mapping must not be empty")
        unknown = [c for c in cat_ids if c is not None and c not in coco_gt.cats]
        if unknown:
            raise InputError(
                f"category ids {unknown} are not in the annotation file (it has {sorted(coco_gt.cats)}); "
                "use the category ids of the dataset being evaluated"
            )
        self.coco_gt = coco_gt
        self.cat_ids = [None if c is None else int(c) for c in cat_ids]
        self._predictions: list[dict[str, Any]] = []
        self._image_ids: dict[int, None] = {}  # insertion-ordered set
        self._all: tuple[tuple[int, int] | None, COCOeval | None] = (None, None)  # (updates seen, their matching)

    @property
    def predictions(self) -> list[dict[str, Any]]:
        """COCO result dicts (image_id, category_id, bbox [x, y, w, h], score) collected so far."""
        return self._predictions

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images passed to `update`, in order; only these are evaluated."""
        return list(self._image_ids)

    def update(self, image_id: int, detections: torch.Tensor) -> None:
        """Add one image's detections.

        Args:
            image_id: COCO image id (must be in the ground truth).
            detections: [n, 6] (x1, y1, x2, y2, score, class_index) in original image pixels; n may be 0.
        """
        image_id = int(image_id)
        if image_id not in self.coco_gt.imgs:
            raise InputError(f"image id {image_id} is not in the annotation file; evaluate images of that dataset")
        if detections.ndim != 2 or detections.shape[1] != 6:
            raise InputError(
                f"detections of image {image_id} have shape {tuple(detections.shape)}, expected [n, 6] "
                "(x1, y1, x2, y2, score, class_index)"
            )
        self._image_ids[image_id] = None
        for x1, y1, x2, y2, score, cls in detections.detach().to("cpu", torch.float64).tolist():
            if self._category_id(cls) is None:
                continue  # a class the dataset does not have
            self._predictions.append(
                {
                    "image_id": image_id,
                    "category_id": self._category_id(cls),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(score, 5),
                }
            )

    def load(self, predictions: list[dict[str, Any]], image_ids: Iterable[int]) -> None:
        """Take saved COCO results (e.g. ``save_json``'s) for ``image_ids`` instead of ``update`` calls."""
        for image_id in image_ids:
            self._image_ids[int(image_id)] = None
        self._predictions.extend(predictions)

    def _category_id(self, class_index: float) -> int | None:
        index = int(class_index)
        if not 0 <= index < len(self.cat_ids):
            raise InputError(
                f"detection class index {index} has no category: the dataset has {len(self.cat_ids)} classes; "
                "check that the model was trained on this dataset's classes"
            )
        return self.cat_ids[index]

    def summarize(self, image_ids: Iterable[int] | None = None) -> dict[str, Any]:
        """Run COCOeval on the updated images (only those of ``image_ids`` when given).

        Returns:
            The 12 COCO stats by name (see METRIC_NAMES; -1.0 where pycocotools has no ground truth for a metric,
            all 0.0 when there are no detections) and `summary_text`, the 12-line summary pycocotools prints.
        """
        ids = set(self._image_ids) if image_ids is None else set(self._image_ids) & {int(i) for i in image_ids}
        predictions = [p for p in self._predictions if p["image_id"] in ids]
        if not predictions:
            # loadRes cannot handle an empty result list; with nothing detected every metric is 0.
            metrics: dict[str, Any] = {name: 0.0 for name in METRIC_NAMES}
            metrics["summary_text"] = (
                f"No detections on the {len(ids)} evaluated image(s): all COCO metrics are 0."
            )
            return metrics
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            coco_eval = self._matched(ids, predictions) if image_ids is not None else self._matched_all()
            coco_eval.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            coco_eval.summarize()
        _logger.debug("pycocotools: %s", log.getvalue().strip())
        metrics = {name: float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}
        metrics["summary_text"] = summary.getvalue().rstrip("\n")
        return metrics

    def _matched(self, ids: set[int], predictions: list[dict[str, Any]]) -> COCOeval:
        """COCOeval after ``evaluate()`` (the per-image matching) on ``ids``."""
        # loadRes adds keys to the dicts it gets, so give it copies and keep `predictions` clean.
        coco_eval = COCOeval(self.coco_gt, self.coco_gt.loadRes(copy.deepcopy(predictions)), "bbox")
        coco_eval.params.imgIds = sorted(ids)
        coco_eval.evaluate()
        return coco_eval

    def _matched_all(self) -> COCOeval:
        """The matching of every updated image, computed once for the summary and the bootstrap alike."""
        key = (len(self._predictions), len(self._image_ids))  # updates since the last matching invalidate it
        if self._all[0] != key:
            with contextlib.redirect_stdout(io.StringIO()):
                self._all = (key, self._matched(set(self._image_ids), self._predictions))
        return self._all[1]

    def matches(self) -> ImageMatches:
        """The per-image matching of every updated image, for ``bootstrap.paired_bootstrap``."""
        if not self._predictions:
            return ImageMatches(self.coco_gt, [], self.image_ids)
        return ImageMatches.from_coco_eval(self._matched_all())

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write the predictions as a COCO results JSON, atomically (temp file in the same folder, then rename)."""
        atomic_write_text(path, json.dumps(self._predictions))
        _logger.info("wrote %d predictions to %s", len(self._predictions), path)
