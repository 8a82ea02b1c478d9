"""Confidence intervals for mAP differences: a paired bootstrap over images.

Two models evaluated on the same images differ by a drop in mAP; how much of that drop is the images is measured
by resampling the images with replacement (the same resample for both models: paired) and re-accumulating COCO's
precision from each image's matches, which COCOeval computes once per model. Re-accumulation follows
``COCOeval.accumulate`` for area ``all`` and 100 detections (the two figures every report here uses); with every
image counted once it gives pycocotools' own mAP@.5:.95 and mAP@.5 (tested). A resample counts an image ``w`` times
by weighting its detections and ground truths by ``w``: the precision envelope COCO reads at its 101 recall points
is the same as with ``w`` copies (a copy's intermediate point is always dominated by its neighbour).
"""
from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.errors import InputError

RESAMPLES = 200  # enough for a 95 % interval's ends to settle to ~0.001 on these mAP scales
LEVEL = 0.95
_RECALLS = np.linspace(0.0, 1.00, 101)  # COCOeval's recThrs
_EPS = np.spacing(1)


@dataclass
class _CategoryMatches:
    """One category's detections over all images, in COCOeval's accumulation order (stable by score)."""

    image: np.ndarray  # [D] index of each detection's image
    matched: np.ndarray  # [T, D] matched a ground truth at IoU threshold t
    ignored: np.ndarray  # [T, D] matched an ignored ground truth (crowd), or outside the area
    gt_per_image: np.ndarray  # [I] non-ignored ground truths of this category per image


class ImageMatches:
    """COCOeval's per-image matching of one model's detections on a list of images, computed once, from which the
    mAP of any weighting of those images follows (``map``)."""

    def __init__(self, coco_gt: COCO, predictions: Sequence[dict[str, Any]], image_ids: Sequence[int]):
        self.image_ids = sorted(int(i) for i in image_ids)  # pycocotools order (CocoEvaluator.summarize sorts)
        index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._categories: list[_CategoryMatches] = []
        if not predictions:
            evaluated = self._no_detections(coco_gt, index)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(list(predictions))), "bbox")
                coco_eval.params.imgIds = self.image_ids
                coco_eval.evaluate()
            evaluated = self._from_coco_eval(coco_eval, index)
        self._categories = evaluated

    @staticmethod
    def _from_coco_eval(coco_eval: COCOeval, index: dict[int, int]) -> list[_CategoryMatches]:
        params = coco_eval.params
        images, areas = len(params.imgIds), len(params.areaRng)
        max_det = params.maxDets[-1]
        out = []
        for k in range(len(params.catIds)):
            # evalImgs is laid out category-major, then area range (0: all), then image
            entries = [e for e in coco_eval.evalImgs[k * areas * images:k * areas * images + images] if e is not None]
            if not entries:
                continue
            gt_per_image = np.zeros(images)
            for e in entries:
                gt_per_image[index[e["image_id"]]] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            if not gt_per_image.any():
                continue  # COCO leaves a category without ground truth out of the mean
            scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for e in entries])
            order = np.argsort(-scores, kind="mergesort")
            image = np.concatenate([np.full(len(e["dtScores"][:max_det]), index[e["image_id"]]) for e in entries])
            matched = np.concatenate([e["dtMatches"][:, :max_det] for e in entries], axis=1)[:, order] != 0
            ignored = np.concatenate([e["dtIgnore"][:, :max_det] for e in entries], axis=1)[:, order].astype(bool)
            out.append(_CategoryMatches(image[order], matched, ignored, gt_per_image))
        return out

    @staticmethod
    def _no_detections(coco_gt: COCO, index: dict[int, int]) -> list[_CategoryMatches]:
        out = []
        for cat_id in sorted(coco_gt.cats):
            gt_per_image = np.zeros(len(index))
            for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(index), catIds=[cat_id])):
                gt_per_image[index[ann["image_id"]]] += 0 if ann.get("iscrowd", 0) else 1
            if gt_per_image.any():
                out.append(_CategoryMatches(np.zeros(0, int), np.zeros((10, 0), bool), np.zeros((10, 0), bool),
                                            gt_per_image))
        return out

    def map(self, weights: np.ndarray | None = None) -> tuple[float, float]:
        """(mAP@.5:.95, mAP@.5) with image i counted ``weights[i]`` times (None: once each, pycocotools' figures)."""
        weights = np.ones(len(self.image_ids)) if weights is None else np.asarray(weights, dtype=np.float64)
        precisions = []
        for cat in self._categories:
            ground_truths = float(weights @ cat.gt_per_image)
            if ground_truths == 0:
                continue
            w = weights[cat.image]
            keep = w > 0
            precisions.append(_precision_at_recalls(cat.matched[:, keep], cat.ignored[:, keep], w[keep],
                                                    ground_truths))
        if not precisions:
            return 0.0, 0.0
        stacked = np.stack(precisions)  # [K, T, R]
        return float(stacked.mean()), float(stacked[:, 0].mean())


def _precision_at_recalls(matched: np.ndarray, ignored: np.ndarray, weights: np.ndarray,
                          ground_truths: float) -> np.ndarray:
    """[T, 101] interpolated precision at COCO's recall points, as COCOeval.accumulate computes it."""
    tp = np.cumsum((matched & ~ignored) * weights, axis=1)
    fp = np.cumsum((~matched & ~ignored) * weights, axis=1)
    out = np.zeros((matched.shape[0], len(_RECALLS)))
    for t in range(matched.shape[0]):
        if tp.shape[1] == 0:
            continue
        recall = tp[t] / ground_truths
        precision = tp[t] / (fp[t] + tp[t] + _EPS)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # COCO's "max to the right"
        picks = np.searchsorted(recall, _RECALLS, side="left")
        valid = picks < len(recall)
        out[t, valid] = envelope[picks[valid]]
    return out


def paired_bootstrap(reference: ImageMatches, model: ImageMatches, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict[str, Any]:
    """The drop (reference - model) in mAP@.5:.95 and mAP@.5 on the same images, with its ``level`` percentile
    interval over ``resamples`` paired resamples of the images (seeded: the same call gives the same interval).

    Raises:
        InputError: the two were evaluated on different images.
    """
    if reference.image_ids != model.image_ids:
        raise InputError("the two evaluations cover different images: compare models evaluated on the same images "
                         f"({len(reference.image_ids)} vs {len(model.image_ids)})")
    if resamples < 2 or not 0 < level < 1:
        raise InputError(f"need at least 2 resamples and a level in (0, 1), got {resamples} and {level}")
    ref_point, model_point = reference.map(), model.map()
    rng = np.random.default_rng(seed)
    n = len(reference.image_ids)
    drops = np.empty((resamples, 2))
    for r in range(resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        drops[r] = np.subtract(reference.map(weights), model.map(weights))
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {"resamples": resamples, "level": level, "seed": seed, "images": n}
    for column, name in enumerate(("mAP50_95", "mAP50")):
        low, high = np.percentile(drops[:, column], [tail, 100 - tail])
        out[name] = {"reference": ref_point[column], "model": model_point[column],
                     "drop": ref_point[column] - model_point[column], "low": float(low), "high": float(high),
                     "std": float(drops[:, column].std(ddof=1))}
    return out


def format_drop(result: dict[str, Any], metric: str = "mAP50_95") -> str:
    """'0.0078 [0.0031, 0.0125]': a drop with its interval, for tables and summaries."""
    d = result[metric]
    return f"{d['drop']:.4f} [{d['low']:.4f}, {d['high']:.4f}]"
