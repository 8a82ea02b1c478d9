"""Tests for utils/inference/evaluate.py's class mapping: a model that names its classes is matched to a COCO file's
categories by name, whatever their ids, order or extra unused categories; by position only when it names nothing
and the counts match; an error otherwise."""
from __future__ import annotations

import json

import pytest

from models import reparameterize
from tests.helpers import SIZE, tiny_detector
from utils.data.coco import CocoDetection
from utils.errors import InputError
from utils.inference.evaluate import class_categories, evaluate
from utils.inference.runners import TorchRunner

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_IDS = [101, 7, 55, 3, 900, 42]  # non-contiguous, not sorted like the original order


def _renumbered(src: str, dst, placeholder: bool = True, shuffle: bool = True) -> str:
    """The annotation file with every category re-numbered (NEW_IDS), listed in another order, plus an unused
    placeholder category 0."""
    data = json.loads(open(src).read())
    old = sorted(c["id"] for c in data["categories"])
    new_of = dict(zip(old, NEW_IDS, strict=True))
    cats = [{**c, "id": new_of[c["id"]]} for c in data["categories"]]
    if shuffle:
        cats = cats[::-1]
    if placeholder:
        cats.insert(0, {"id": 0, "name": "placeholder", "supercategory": "none"})
    data["categories"] = cats
    data["annotations"] = [{**a, "category_id": new_of[a["category_id"]]} for a in data["annotations"]]
    dst.write_text(json.dumps(data))
    return str(dst)


@pytest.fixture(scope="module")
def named_model(tiny_val):
    model = reparameterize(tiny_detector())
    model.config = {**model.config, "names": CocoDetection(tiny_val["json"], tiny_val["images"], SIZE).class_names}
    return model


def _map(model, ann_file, images) -> float:
    dataset = CocoDetection(ann_file, images, img_size=SIZE)
    return evaluate(TorchRunner(model), dataset, batch_size=4, workers=0, progress=False)["mAP50_95"]


def test_named_classes_match_renumbered_shuffled_categories_with_an_unused_one(named_model, tiny_val, tmp_path):
    plain = _map(named_model, tiny_val["json"], tiny_val["images"])
    assert plain > 0
    renumbered = _renumbered(tiny_val["json"], tmp_path / "renumbered.json")
    assert _map(named_model, renumbered, tiny_val["images"]) == pytest.approx(plain, abs=1e-12)


def test_mapping_by_name_and_by_position(named_model, tiny_val, tmp_path):
    names = named_model.config["names"]
    renumbered = CocoDetection(_renumbered(tiny_val["json"], tmp_path / "r.json"), tiny_val["images"], SIZE)
    assert class_categories(6, renumbered, names) == NEW_IDS  # class i keeps its name's category
    same_count = CocoDetection(_renumbered(tiny_val["json"], tmp_path / "s.json", placeholder=False),
                               tiny_val["images"], SIZE)
    assert class_categories(6, same_count, None) == sorted(NEW_IDS)  # no names: sorted ids, as YOLOv6 does
    with pytest.raises(InputError, match="carries no class names"):
        class_categories(6, renumbered, None)
    with pytest.raises(InputError, match="none of the model's class names"):
        class_categories(6, renumbered, [f"other{i}" for i in range(6)])
    with pytest.raises(InputError, match="6 classes but carries 2 class names"):
        class_categories(6, renumbered, names[:2])
    partial = class_categories(6, renumbered, names[:5] + ["unknown"])  # a class the file lacks: left out
    assert partial == NEW_IDS[:5] + [None]
