"""utils.quant.peers: the adapters that drive NNCF and ModelOpt on our model, data and evaluation.

The pieces that need no peer run everywhere; the one test that runs a peer is skipped, with its reason, where the
optional requirements-peers.txt is not installed (CI's venv)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import load_model
from tests.helpers import SIZE
from utils.data.calibration import calibration_loader
from utils.data.coco import CocoDetection
from utils.deploy.onnx_export import export_verified
from utils.deploy.onnx_graph import qdq_summary
from utils.inference.evaluate import evaluate
from utils.inference.postprocess import non_max_suppression
from utils.inference.runners import OnnxRuntimeRunner, class_names_of
from utils.quant import peers


@pytest.fixture(scope="module")
def fp32_onnx(tiny_checkpoint, tiny_val, tmp_path_factory):
    import onnx

    path = tmp_path_factory.mktemp("peers") / "fp32.onnx"
    model = load_model(tiny_checkpoint)
    export_verified(model, path, torch.rand(2, 3, SIZE, SIZE), img_size=SIZE, dynamic_batch=True)
    return path, onnx.load(str(path))


def test_missing_peer_is_named_in_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(peers.PEER_MODULES, "nncf", "a_module_that_is_not_installed")
    missing = peers.missing_peers(["nncf"])
    assert list(missing) == ["nncf"]
    assert "\n" not in missing["nncf"] and "pip install -r requirements-peers.txt" in missing["nncf"]
    assert peers.missing_peers([]) == {}


def test_effective_bits_weights_each_conv_by_its_weight_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))  # 108 and 8 weights
    assert peers.effective_bits(model, []) == 8.0
    assert peers.effective_bits(model, ["0", "2"]) == 16.0
    assert peers.effective_bits(model, ["2"]) == pytest.approx((8 * 108 + 16 * 8) / 116)
    with pytest.raises(Exception, match="not convolutions"):
        peers.effective_bits(model, ["1"])


def test_calibration_images_are_our_calibration_loaders_images(tiny_val):
    images = peers.calibration_images(tiny_val["images"], SIZE, 6, workers=0)
    ours = torch.cat([b["image"] for b in calibration_loader(tiny_val["images"], SIZE, 6, 1, 0)])
    assert images.shape == (6, 3, SIZE, SIZE) and images.dtype == np.float32
    assert np.array_equal(images, ours.numpy())


def test_pseudo_targets_are_the_float_models_confident_detections(tiny_checkpoint):
    model = load_model(tiny_checkpoint).eval()
    batch = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    [targets] = peers.pseudo_targets(model, [batch], conf=0.01)
    with torch.no_grad():
        detections = non_max_suppression(model(batch), conf_thres=0.01, iou_thres=0.65)
    assert targets.shape == (sum(len(d) for d in detections), 6)
    for i, det in enumerate(detections):
        rows = targets[targets[:, 0] == i]
        assert torch.equal(rows[:, 1], det[:, 5]) and torch.equal(rows[:, 2:], det[:, :4])


def test_nncf_validation_gives_the_evaluations_map_on_any_images(fp32_onnx, tiny_val):
    path, model = fp32_onnx
    dataset = CocoDetection(tiny_val["json"], tiny_val["images"], img_size=SIZE)
    names = class_names_of({p.key: p.value for p in model.metadata_props})
    validation = peers.OnnxMapValidation(dataset, names, batch_size=3)
    one = dataset.image_ids[2]
    truth = evaluate(OnnxRuntimeRunner(path, optimization="all"), dataset, batch_size=4, workers=0, progress=False,
                     subsets={"one": [one]})
    metric, per_item = validation(model, validation.indices())
    assert per_item is None  # NNCF's metric mode: it asks image by image
    assert metric == pytest.approx(truth["mAP50_95"], abs=1e-9)
    assert validation(model, [2])[0] == pytest.approx(truth["subsets"]["one"]["mAP50_95"], abs=1e-9)
    assert validation.calls == 2


@pytest.mark.skipif(bool(peers.missing_peers(["nncf", "modelopt-onnx"])),
                    reason="NNCF / ModelOpt not installed (optional: pip install -r requirements-peers.txt)")
def test_peers_quantize_our_onnx_with_our_calibration_images(fp32_onnx, tiny_val, tmp_path):
    import onnx

    path, model = fp32_onnx
    images = peers.calibration_images(tiny_val["images"], SIZE, 8, workers=0)
    nncf_model = peers.nncf_ptq(model, images)
    counts = qdq_summary(nncf_model)
    assert counts["quantized_conv"] > 0 and counts["quantize_linear"] > 0
    out = peers.modelopt_onnx_ptq(path, images, tmp_path / "mo.onnx", "max", ["Conv"])
    counts = qdq_summary(onnx.load(str(out)))
    assert counts["quantized_conv"] > 0 and counts["quantized_conv"] + counts["float_conv"] == \
        qdq_summary(model)["float_conv"]
