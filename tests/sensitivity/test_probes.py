"""Tests for utils/sensitivity/probes.py: what each probe measures, in both directions."""
from __future__ import annotations

import pytest

from tests.helpers import SIZE, calibrated_tiny, tiny_detector
from utils.data.calibration import proxy_batches
from utils.data.coco import CocoDetection
from utils.inference.evaluate import evaluate
from utils.inference.output_error import DetectionError
from utils.inference.runners import TorchRunner
from utils.quant import quantizers as quant
from utils.sensitivity.metrics import PROXY_METHODS, sensitivity_order
from utils.sensitivity.probes import MapProbe, ProxyProbe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_amax_makes_a_layer_look_worse(tiny_val):
    qmodel = calibrated_tiny(tiny_detector(), tiny_val)
    batches, _ = proxy_batches(tiny_val["images"], SIZE, 4, 4, workers=0)
    layer = "neck.Rep_p3.block.0.rbr_reparam"
    before = {m: ProxyProbe(qmodel, batches, m)(layer) for m in PROXY_METHODS}
    quantizer = quant.quant_layers(qmodel)[layer].input_quantizer
    quantizer._amax.mul_(1e-3)  # clips almost every activation
    after = {m: ProxyProbe(qmodel, batches, m)(layer) for m in PROXY_METHODS}
    assert after["sqnr"]["sqnr_db"] < before["sqnr"]["sqnr_db"] - 10
    assert after["cosine"]["cosine"] < before["cosine"]["cosine"]
    assert after["mse"]["mse"] > before["mse"]["mse"]
    assert after["sqnr"]["sqnr_db_neck"] < before["sqnr"]["sqnr_db_neck"]


def test_revert_probe_measures_the_model_with_only_that_layer_float(tiny_val):
    """Independent truth: the proxy of the full-INT8 model with one layer switched off by hand, against the float
    outputs; and reverting a layer whose amax clips everything is what repairs the model most."""
    qmodel = calibrated_tiny(tiny_detector(), tiny_val)
    batches, _ = proxy_batches(tiny_val["images"], SIZE, 4, 4, workers=0)
    layer = "neck.Rep_p3.block.0.rbr_reparam"
    quant.quant_layers(qmodel)[layer].input_quantizer._amax.mul_(1e-3)
    probe = ProxyProbe(qmodel, batches, "sqnr", direction="revert")
    layers = list(quant.quant_layers(qmodel))
    values = {name: probe(name)["sqnr_db"] for name in layers}
    quant.disable_all(qmodel)
    refs = [qmodel(x) for x in batches]
    quant.enable_all(qmodel)
    quant.set_quantized(qmodel, [layer], False)
    error = DetectionError()
    for x, ref in zip(batches, refs, strict=True):
        error.update(ref, qmodel(x))
    assert values[layer] == pytest.approx(error.head("sqnr"), abs=1e-9)
    assert layers[sensitivity_order(list(values.values()), "sqnr", "revert")[0]] == layer
    assert probe.baselines()["ptq"]["sqnr_db"] < values[layer] - 10


def test_map_probe_in_both_directions_and_its_halves(tiny_val):
    """single: only the layer INT8; revert: all but the layer INT8 (checked against evaluate on the same states);
    the halves are the mAP of the even / odd images of the same predictions."""
    qmodel = calibrated_tiny(tiny_detector(), tiny_val)
    dataset = CocoDetection(tiny_val["json"], tiny_val["images"], img_size=SIZE)
    layer = list(quant.quant_layers(qmodel))[3]
    single = MapProbe(qmodel, dataset, batch_size=8, workers=0)(layer)
    revert = MapProbe(qmodel, dataset, batch_size=8, workers=0, direction="revert")(layer)
    runner = TorchRunner(qmodel)
    quant.quantize_only(qmodel, [layer])
    assert single["mAP50_95"] == evaluate(runner, dataset, 8, 0, progress=False)["mAP50_95"]
    quant.enable_all(qmodel)
    quant.set_quantized(qmodel, [layer], False)
    assert revert["mAP50_95"] == evaluate(runner, dataset, 8, 0, progress=False)["mAP50_95"]
    half = CocoDetection(tiny_val["json"], tiny_val["images"], img_size=SIZE)
    half.image_ids = dataset.image_ids[1::2]
    assert revert["mAP50_95_half_b"] == pytest.approx(
        evaluate(runner, half, 8, 0, progress=False)["mAP50_95"], abs=1e-12)
    assert set(revert) == {"mAP50", "mAP50_95", "mAP50_95_half_a", "mAP50_95_half_b"}
