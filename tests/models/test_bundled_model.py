"""The bundled demo detector: intact, loads, and reaches its recorded mAP on the regenerated synthetic val set."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from models import load_model, read_checkpoint
from utils.data.coco import CocoDetection
from utils.data.synthetic import generate_synthetic_coco
from utils.inference.evaluate import evaluate
from utils.inference.runners import TorchRunner

ASSETS = Path(__file__).resolve().parents[2] / "assets"
WEIGHTS = ASSETS / "yolov6n_synthetic.pt"
RECORD = json.loads(WEIGHTS.with_suffix(".json").read_text())


def test_bundled_checkpoint_is_the_recorded_file():
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == RECORD["sha256"]
    assert WEIGHTS.stat().st_size == RECORD["bytes"] < 11 * 2 ** 20


def test_bundled_checkpoint_is_a_trained_training_form_yolov6n():
    ckpt = read_checkpoint(WEIGHTS)
    assert ckpt.source == "ours" and not ckpt.deployed and ckpt.meta["trained"]
    assert ckpt.config["name"] == "yolov6n" and ckpt.config["block"] == "repvgg"
    assert ckpt.config["num_classes"] == 6 == len(ckpt.config["names"])


@pytest.mark.slow
def test_bundled_checkpoint_reaches_its_recorded_map(tmp_path):
    data = RECORD["data"]
    info = generate_synthetic_coco(tmp_path, num_train=0, num_val=data["val"], img_size=data["img_size"],
                                   seed=data["seed"])
    dataset = CocoDetection(info["val"]["ann_file"], info["val"]["img_dir"], img_size=data["img_size"])
    metrics = evaluate(TorchRunner(load_model(WEIGHTS)), dataset, batch_size=16, workers=2, progress=False)
    assert RECORD["mAP50_95"] >= 0.50
    assert metrics["mAP50_95"] == pytest.approx(RECORD["mAP50_95"], abs=0.01)
    assert metrics["mAP50"] == pytest.approx(RECORD["mAP50"], abs=0.01)
