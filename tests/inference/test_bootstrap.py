"""Paired bootstrap of mAP differences (utils.inference.bootstrap) against pycocotools and hand-known answers."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.errors import InputError
from utils.inference.bootstrap import DropBootstrap, ImageMatches, format_drop, paired_bootstrap, predicted_interval


def _coco(dataset: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(dataset)
        coco.createIndex()
    return coco


def _noisy_world(seed: int = 0, images: int = 30):
    """Ground truth of 3 categories (one crowd box) and detections that find most of it, with noise, misses, false
    positives and tied scores."""
    rng = np.random.default_rng(seed)
    dataset = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 5)]}
    predictions = []
    for image_id in range(1, images + 1):
        dataset["images"].append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(0, 5)):
            x, y, w, h = rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(10, 200), rng.uniform(10, 150)
            cat = int(rng.choice([1, 2, 5]))
            ann_id = len(dataset["annotations"]) + 1
            dataset["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat,
                                           "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(ann_id == 7)})
            if rng.uniform() < 0.8:
                jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
                predictions.append({"image_id": image_id, "category_id": cat, "bbox": list(np.add([x, y, w, h],
                                    jitter)), "score": float(np.round(rng.uniform(0.2, 1.0), 1))})
        for _ in range(rng.integers(0, 3)):
            predictions.append({"image_id": image_id, "category_id": int(rng.choice([1, 2, 5])),
                                "bbox": [rng.uniform(0, 500), rng.uniform(0, 400), 40.0, 30.0],
                                "score": float(rng.uniform(0.05, 0.9))})
    return dataset, predictions


def _pycocotools(dataset: dict, predictions: list[dict]) -> tuple[float, float]:
    coco = _coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(copy.deepcopy(predictions)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return float(coco_eval.stats[0]), float(coco_eval.stats[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_image_once_gives_pycocotools_map(seed):
    dataset, predictions = _noisy_world(seed)
    matches = ImageMatches(_coco(dataset), predictions, [im["id"] for im in dataset["images"]])
    assert matches.map() == pytest.approx(_pycocotools(dataset, predictions), abs=1e-12)


def test_an_image_counted_twice_is_the_image_copied():
    dataset, predictions = _noisy_world(3, images=12)
    weights = np.array([0, 2, 1, 3, 1, 0, 1, 1, 2, 1, 1, 0], dtype=float)
    # independent truth: a dataset in which image i really appears weights[i] times (new ids, same boxes)
    copied = {"images": [], "annotations": [], "categories": dataset["categories"]}
    copied_predictions = []
    for i, image in enumerate(dataset["images"]):
        for copy_number in range(int(weights[i])):
            new_id = image["id"] * 100 + copy_number
            copied["images"].append({**image, "id": new_id})
            copied["annotations"] += [{**a, "id": len(copied["annotations"]) + j + 1, "image_id": new_id}
                                      for j, a in enumerate(a for a in dataset["annotations"]
                                                            if a["image_id"] == image["id"])]
            copied_predictions += [{**p, "image_id": new_id} for p in predictions if p["image_id"] == image["id"]]
    matches = ImageMatches(_coco(dataset), predictions, [im["id"] for im in dataset["images"]])
    assert matches.map(weights) == pytest.approx(_pycocotools(copied, copied_predictions), abs=1e-12)


def _one_box_per_image(found: int, images: int = 200) -> tuple[COCO, list[dict], list[dict], list[int]]:
    """One object per image; the reference finds every one, the model the first ``found`` (score 0.9 each)."""
    dataset = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in range(images)],
               "annotations": [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 50, 50],
                                "area": 2500, "iscrowd": 0} for i in range(images)],
               "categories": [{"id": 1, "name": "thing"}]}
    reference = [{"image_id": i, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9} for i in range(images)]
    return _coco(dataset), reference, reference[:found], list(range(images))


def test_the_same_model_drops_nothing_with_no_spread():
    coco, reference, _, ids = _one_box_per_image(200)
    result = paired_bootstrap(ImageMatches(coco, reference, ids), ImageMatches(coco, reference, ids), resamples=50)
    assert result["mAP50_95"]["drop"] == 0 and result["mAP50_95"]["low"] == 0 and result["mAP50_95"]["high"] == 0


def test_the_interval_is_a_proportions_interval():
    # The model finds 100 of 200 objects at precision 1, so its AP is the share of COCO's 101 recall points at or
    # below its recall r: about r, and the drop about 1 - r. Over resamples r is a binomial proportion with
    # standard error sqrt(0.25 / 200) = 0.035, so the 95 % interval spans about 1.96 * 0.035 either side.
    coco, reference, found, ids = _one_box_per_image(100)
    result = paired_bootstrap(ImageMatches(coco, reference, ids), ImageMatches(coco, found, ids), resamples=400)
    drop = result["mAP50_95"]
    assert drop["drop"] == pytest.approx(1 - 51 / 101)  # recall points 0.00 ... 0.50
    assert drop["std"] == pytest.approx(0.035, abs=0.006)
    assert drop["low"] == pytest.approx(drop["drop"] - 0.069, abs=0.015)
    assert drop["high"] == pytest.approx(drop["drop"] + 0.069, abs=0.015)
    assert result == paired_bootstrap(ImageMatches(coco, reference, ids), ImageMatches(coco, found, ids),
                                      resamples=400)  # seeded
    assert format_drop(drop).startswith(f"{drop['drop']:.4f} [")


def test_no_detections_and_mismatched_images():
    coco, reference, _, ids = _one_box_per_image(10, images=10)
    empty = ImageMatches(coco, [], ids)
    assert empty.map() == (0.0, 0.0)
    assert paired_bootstrap(ImageMatches(coco, reference, ids), empty, resamples=20)["mAP50"]["low"] == 1.0
    with pytest.raises(InputError, match="different images"):
        paired_bootstrap(ImageMatches(coco, reference, ids), ImageMatches(coco, reference, ids[:5]))


def test_one_reference_many_models_and_the_prediction_for_new_images():
    coco, reference, found, ids = _one_box_per_image(100)
    ref, model = ImageMatches(coco, reference, ids), ImageMatches(coco, found, ids)
    shared = DropBootstrap(ref, resamples=100, seed=3)
    # the reference's resamples are drawn once: each comparison equals a fresh paired bootstrap with that seed
    assert shared.compare(model) == paired_bootstrap(ref, model, resamples=100, seed=3)
    assert shared.compare(ref)["mAP50_95"]["high"] == 0
    result = shared.compare(model)
    # a new set as large as this one: the drop's SD sqrt(2) times larger; 1.96 SDs either side at 95 %
    half = 1.959964 * result["mAP50_95"]["std"] * 2 ** 0.5
    predicted = predicted_interval(result, new_images=200)
    assert predicted["low"] == pytest.approx(result["mAP50_95"]["drop"] - half, abs=1e-4)
    assert predicted["high"] == pytest.approx(result["mAP50_95"]["drop"] + half, abs=1e-4)
    # a huge new set adds no sampling error of its own: the prediction narrows to the interval of the true drop
    narrow = predicted_interval(result, new_images=10**9)
    assert narrow["high"] - narrow["low"] == pytest.approx(2 * 1.959964 * result["mAP50_95"]["std"], abs=2e-4)
