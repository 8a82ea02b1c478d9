"""Runner x COCO-format dataset -> predictions -> COCO metrics. Used by eval_coco.py and every later stage."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
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


def check_num_classes(predictions: torch.Tensor, dataset: CocoDetection) -> None:
    """The model's class count must match the dataset's categories, or class ids would be mapped wrongly."""
    num_classes = predictions.shape[-1] - 5
    if num_classes != len(dataset.cat_ids):
        raise InputError(f"the model predicts {num_classes} classes but {dataset.ann_file} has "
                         f"{len(dataset.cat_ids)} categories; evaluate on the dataset the model was trained for")


def evaluate(runner: Runner, dataset: CocoDetection, batch_size: int = 8, workers: int = 2, conf: float = 0.03,
             iou: float = 0.65, max_det: int = 300, progress: bool = True,
             save_json: str | Path | None = None,
             subsets: Mapping[str, Iterable[int]] | None = None) -> dict[str, Any]:
    """COCO mAP of ``runner`` on ``dataset``, YOLOv6's evaluation post-processing (multi-label NMS).

    Args:
        subsets: name -> COCO image ids; each subset's mAP50 / mAP50_95 is also computed from the same predictions
            (e.g. the two halves of a split-half reliability check).

    Returns a flat dict: the 12 COCO stats (``mAP50_95``, ``mAP50``, ...), ``images``, ``unreadable``,
    ``seconds``, ``images_per_s`` (end to end, data loading included), ``summary_text`` and, with ``subsets``,
    ``subsets`` (name -> {mAP50, mAP50_95}).
    """
    evaluator = CocoEvaluator(dataset.coco, dataset.cat_ids)
    loader = create_dataloader(dataset, batch_size, workers=workers)
    images = unreadable = 0
    start = time.perf_counter()
    for batch in tqdm(loader, desc=f"eval [{runner.name}]", unit="batch", disable=not progress, leave=False):
        predictions = runner(batch["image"])
        check_num_classes(predictions, dataset)
        detections = non_max_suppression(predictions, conf_thres=conf, iou_thres=iou, max_det=max_det)
        for i, det in enumerate(detections):
            if not batch["ok"][i]:
                unreadable += 1
                continue
            det = det.clone()
            det[:, :4] = scale_boxes_to_original(det[:, :4], batch["ratio"][i], batch["pad"][i], batch["orig_hw"][i])
            evaluator.update(int(batch["image_id"][i]), det)
            images += 1
    seconds = time.perf_counter() - start
    if unreadable:
        _logger.warning("%d of %d images could not be read and were left out of the metrics (see warnings above)",
                        unreadable, len(dataset))
    metrics = evaluator.summarize()
    if subsets:
        metrics["subsets"] = {name: {k: evaluator.summarize(ids)[k] for k in ("mAP50", "mAP50_95")}
                              for name, ids in subsets.items()}
    if save_json is not None:
        evaluator.save_json(save_json)
    metrics.update(images=images, unreadable=unreadable, seconds=round(seconds, 3),
                   images_per_s=round(images / seconds, 2) if seconds > 0 else 0.0)
    return metrics
