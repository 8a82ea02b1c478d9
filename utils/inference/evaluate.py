"""Runner x COCO-format dataset -> predictions -> COCO metrics. Used by eval_coco.py and every later stage."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from utils.data.coco import CocoDetection, create_dataloader, scale_boxes_to_original
from utils.errors import InputError
from utils.inference.coco_eval import CocoEvaluator
from utils.inference.postprocess import non_max_suppression
from utils.inference.runners import Runner

_logger = logging.getLogger(__name__)


def class_categories(num_classes: int, dataset: CocoDetection,
                     class_names: Sequence[str] | None = None) -> list[int | None]:
    """The COCO category id of each of the model's classes (None: the dataset does not have that class).

    By name when the model carries class names (COCO's ids may be any integers in any order, and a file may hold
    categories the model does not predict, e.g. a placeholder or an unused class); by position (sorted ids) when it
    does not and the counts match; otherwise an InputError, since any mapping would be a guess.
    """
    file = dataset.ann_file
    if class_names:
        if len(class_names) != num_classes:
            raise InputError(f"the model predicts {num_classes} classes but carries {len(class_names)} class names; "
                             "its checkpoint is inconsistent: re-save it with one name per class")
        by_name: dict[str, int] = {}
        for cat_id, name in zip(dataset.cat_ids, dataset.class_names, strict=True):
            if name in by_name:
                raise InputError(f"{file} has two categories named {name!r} (ids {by_name[name]} and {cat_id}); "
                                 "give each category its own name")
            by_name[name] = cat_id
        mapping = [by_name.get(str(name)) for name in class_names]
        if all(cat_id is None for cat_id in mapping):
            raise InputError(f"none of the model's class names ({', '.join(map(str, class_names[:5]))}, ...) is a "
                             f"category name of {file} ({', '.join(dataset.class_names[:5])}, ...): evaluate on the "
                             "dataset the model was trained for")
        missing = [str(n) for n, c in zip(class_names, mapping, strict=True) if c is None]
        if missing:
            _logger.warning("model classes without a category in %s (their detections are left out): %s", file,
                            ", ".join(missing))
        unpredicted = sorted(set(dataset.annotated_categories()) - {c for c in mapping if c is not None})
        if unpredicted:
            _logger.warning("categories of %s with annotations the model cannot predict (they count as missed): %s",
                            file, ", ".join(dataset.class_names[dataset.cat_id_to_index[c]] for c in unpredicted))
        return mapping
    if num_classes != len(dataset.cat_ids):
        raise InputError(f"the model predicts {num_classes} classes but {file} has {len(dataset.cat_ids)} "
                         "categories, and the model carries no class names to match them by: evaluate on the "
                         "dataset the model was trained for, or use a checkpoint that names its classes")
    return list(dataset.cat_ids)


def add_batch_detections(evaluator: CocoEvaluator, predictions: torch.Tensor, batch: Mapping[str, Any],
                         conf: float = 0.03, iou: float = 0.65, max_det: int = 300) -> int:
    """A collated batch's raw predictions -> YOLOv6's NMS -> boxes in original image pixels -> ``evaluator``;
    unreadable images (ok False) are left out. Returns how many images were scored."""
    scored = 0
    for i, det in enumerate(non_max_suppression(predictions, conf_thres=conf, iou_thres=iou, max_det=max_det)):
        if not batch["ok"][i]:
            continue
        det = det.clone()
        det[:, :4] = scale_boxes_to_original(det[:, :4], batch["ratio"][i], batch["pad"][i], batch["orig_hw"][i])
        evaluator.update(int(batch["image_id"][i]), det)
        scored += 1
    return scored


def evaluate(runner: Runner, dataset: CocoDetection, batch_size: int = 8, workers: int = 2, conf: float = 0.03,
             iou: float = 0.65, max_det: int = 300, progress: bool = True,
             save_json: str | Path | None = None,
             subsets: Mapping[str, Iterable[int]] | None = None,
             class_names: Sequence[str] | None = None, matches: bool = False) -> dict[str, Any]:
    """COCO mAP of ``runner`` on ``dataset``, YOLOv6's evaluation post-processing (multi-label NMS).

    Args:
        subsets: name -> COCO image ids; each subset's mAP50 / mAP50_95 is also computed from the same predictions
            (e.g. the two halves of a split-half reliability check).
        class_names: the model's class names, to match the dataset's categories by name (default: the runner's
            ``class_names``; without names classes match categories by position, see ``class_categories``).
        matches: also return ``matches``, the per-image matching that ``bootstrap.paired_bootstrap`` compares.

    Returns a flat dict: the 12 COCO stats (``mAP50_95``, ``mAP50``, ...), ``images``, ``unreadable``,
    ``seconds``, ``images_per_s`` (end to end, data loading included), ``summary_text`` and, with ``subsets``,
    ``subsets`` (name -> {mAP50, mAP50_95}).
    """
    names = class_names if class_names is not None else getattr(runner, "class_names", None)
    evaluator: CocoEvaluator | None = None
    loader = create_dataloader(dataset, batch_size, workers=workers)
    images = unreadable = 0
    start = time.perf_counter()
    for batch in tqdm(loader, desc=f"eval [{runner.name}]", unit="batch", disable=not progress, leave=False):
        predictions = runner(batch["image"])
        if evaluator is None:
            evaluator = CocoEvaluator(dataset.coco, class_categories(predictions.shape[-1] - 5, dataset, names))
        scored = add_batch_detections(evaluator, predictions, batch, conf, iou, max_det)
        images += scored
        unreadable += len(batch["ok"]) - scored
    seconds = time.perf_counter() - start
    if unreadable:
        _logger.warning("%d of %d images could not be read and were left out of the metrics (see warnings above)",
                        unreadable, len(dataset))
    if evaluator is None:
        raise InputError(f"{dataset.ann_file} lists no images to evaluate: check the annotation file")
    metrics = evaluator.summarize()
    if subsets:
        metrics["subsets"] = {name: {k: evaluator.summarize(ids)[k] for k in ("mAP50", "mAP50_95")}
                              for name, ids in subsets.items()}
    if save_json is not None:
        evaluator.save_json(save_json)
    if matches:
        metrics["matches"] = evaluator.matches()
    metrics.update(images=images, unreadable=unreadable, seconds=round(seconds, 3),
                   images_per_s=round(images / seconds, 2) if seconds > 0 else 0.0)
    return metrics


def read_predictions(path: str | Path, dataset: CocoDetection) -> list[dict[str, Any]]:
    """A COCO results file (``--save-json``'s: a list of image_id / category_id / bbox / score), restricted to the
    dataset's images.

    Raises:
        InputError: the file is missing or is not a results list.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read predictions {path} ({type(exc).__name__}): pass a results file written by "
                         "eval_coco.py --save-json") from None
    keys = {"image_id", "category_id", "bbox", "score"}
    if not isinstance(data, list) or not all(isinstance(p, dict) and keys <= set(p) for p in data):
        raise InputError(f"{path} is not a COCO results list (dicts with {', '.join(sorted(keys))}): pass a file "
                         "written by eval_coco.py --save-json")
    unknown = {p["category_id"] for p in data} - set(dataset.cat_ids)
    if unknown:
        raise InputError(f"{path} has categories {sorted(unknown)[:5]} that {dataset.ann_file} does not: the "
                         "predictions are for another dataset")
    served = set(dataset.image_ids)
    return [p for p in data if p["image_id"] in served]


def evaluate_predictions(path: str | Path, dataset: CocoDetection) -> dict[str, Any]:
    """The metrics (and ``matches``) of a saved results file on the dataset's images, as ``evaluate`` gives them."""
    predictions = read_predictions(path, dataset)
    evaluator = CocoEvaluator(dataset.coco, list(dataset.cat_ids))
    evaluator.load(predictions, dataset.image_ids)
    metrics = evaluator.summarize()
    metrics.update(matches=evaluator.matches(), images=len(dataset.image_ids), unreadable=0)
    return metrics
