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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
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
        self._categories: list[_CategoryMatches] = []  # none without detections: every precision is then 0
        if predictions:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(list(predictions))), "bbox")
                coco_eval.params.imgIds = self.image_ids
                coco_eval.evaluate()
            self._categories = _category_matches(coco_eval)

    @classmethod
    def from_coco_eval(cls, coco_eval: COCOeval) -> ImageMatches:
        """The matching of a COCOeval that has run ``evaluate()`` (its work is reused, not repeated)."""
        matches = cls.__new__(cls)
        matches.image_ids = [int(i) for i in coco_eval.params.imgIds]
        matches._categories = _category_matches(coco_eval)
        return matches

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


def _category_matches(coco_eval: COCOeval) -> list[_CategoryMatches]:
    """Each category's detections (with ground truth on the evaluated images) from an evaluated COCOeval."""
    params = coco_eval.params
    index = {int(image_id): i for i, image_id in enumerate(params.imgIds)}
    images, areas = len(params.imgIds), len(params.areaRng)
    max_det = params.maxDets[-1]
    out = []
    for k in range(len(params.catIds)):
        # evalImgs is laid out category-major, then area range (0: all), then image
        entries = [e for e in coco_eval.evalImgs[k * areas * images:k * areas * images + images] if e is not None]
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


def _precision_at_recalls(matched: np.ndarray, ignored: np.ndarray, weights: np.ndarray,
                          ground_truths: float) -> np.ndarray:
    """[T, 101] interpolated precision at COCO's recall points, as COCOeval.accumulate computes it."""
    tp = np.cumsum((matched & ~ignored) * weights, axis=1)
    fp = np.cumsum((~matched & ~ignored) * weights, axis=1)
    out = np.zeros((matched.shape[0], len(_RECALLS)))
    if tp.shape[1] == 0:
        return out
    for t in range(matched.shape[0]):
        recall = tp[t] / ground_truths
        precision = tp[t] / (fp[t] + tp[t] + _EPS)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # COCO's "max to the right"
        picks = np.searchsorted(recall, _RECALLS, side="left")
        valid = picks < len(recall)
        out[t, valid] = envelope[picks[valid]]
    return out


class DropBootstrap:
    """Paired resamples of one reference's images, drawn once (seeded), with the reference's mAP on each: every model
    compared with it (``compare``) reuses them, so a search comparing many models pays the reference once and all
    its intervals use the same resamples."""

    def __init__(self, reference: ImageMatches, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL):
        if resamples < 2 or not 0 < level < 1:
            raise InputError(f"need at least 2 resamples and a level in (0, 1), got {resamples} and {level}")
        self.reference, self.resamples, self.seed, self.level = reference, resamples, seed, level
        rng = np.random.default_rng(seed)
        n = len(reference.image_ids)
        self._weights = [np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64) for _ in range(resamples)]
        self._point = reference.map()
        self._resampled = np.array([reference.map(w) for w in self._weights])  # [resamples, 2]

    def compare(self, model: ImageMatches) -> dict[str, Any]:
        """The drop (reference - model) in mAP@.5:.95 and mAP@.5 with its ``level`` percentile interval.

        Raises:
            InputError: the model was evaluated on other images than the reference.
        """
        if self.reference.image_ids != model.image_ids:
            raise InputError("the two evaluations cover different images: compare models evaluated on the same "
                             f"images ({len(self.reference.image_ids)} vs {len(model.image_ids)})")
        model_point = model.map()
        drops = self._resampled - np.array([model.map(w) for w in self._weights])
        tail = (1 - self.level) / 2 * 100
        out: dict[str, Any] = {"resamples": self.resamples, "level": self.level, "seed": self.seed,
                               "images": len(self.reference.image_ids)}
        for column, name in enumerate(("mAP50_95", "mAP50")):
            low, high = np.percentile(drops[:, column], [tail, 100 - tail])
            out[name] = {"reference": self._point[column], "model": model_point[column],
                         "drop": self._point[column] - model_point[column], "low": float(low), "high": float(high),
                         "std": float(drops[:, column].std(ddof=1))}
        return out


def paired_bootstrap(reference: ImageMatches, model: ImageMatches, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict[str, Any]:
    """The drop (reference - model) in mAP@.5:.95 and mAP@.5 on the same images, with its ``level`` percentile
    interval over ``resamples`` paired resamples of the images (seeded: the same call gives the same interval).

    Raises:
        InputError: the two were evaluated on different images.
    """
    return DropBootstrap(reference, resamples, seed, level).compare(model)


def predicted_interval(result: dict[str, Any], new_images: int, metric: str = "mAP50_95") -> dict[str, float]:
    """Where the drop measured on ``result``'s images should fall on ``new_images`` other images of the same kind
    (normal prediction interval at the result's level): the true drop is uncertain by the bootstrap SD, and a new
    set adds its own sampling error, SD * sqrt(n / new_images); both together widen the interval by
    sqrt(1 + n / new_images)."""
    drop, std = result[metric]["drop"], result[metric]["std"]
    z = float(NormalDist().inv_cdf(0.5 + result["level"] / 2))
    half = z * std * math.sqrt(1 + result["images"] / new_images)
    return {"drop": round(drop, 4), "low": round(drop - half, 4), "high": round(drop + half, 4)}


def rounded_drop(result: dict[str, Any], metric: str = "mAP50_95") -> dict[str, float]:
    """{drop, low, high} of one metric of a ``paired_bootstrap`` result, to 4 decimals (reports keep these)."""
    return {k: round(result[metric][k], 4) for k in ("drop", "low", "high")}


def format_drop(drop: dict[str, float]) -> str:
    """'0.0078 [0.0031, 0.0125]': a {drop, low, high} for tables and summaries."""
    return f"{drop['drop']:.4f} [{drop['low']:.4f}, {drop['high']:.4f}]"
