"""Tests for utils/sensitivity/reuse.py: reusing float sub-module outputs changes no probe value, and reuse that
disagrees with a full forward pass is turned off."""
from __future__ import annotations

import pytest

from tests.helpers import SIZE, calibrated_tiny, tiny_detector
from utils.data.calibration import proxy_batches
from utils.quant import quantizers as quant
from utils.sensitivity.probes import ProxyProbe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_reuse_changes_nothing(tiny_val):
    qmodel = calibrated_tiny(tiny_detector(), tiny_val)
    batches, _ = proxy_batches(tiny_val["images"], SIZE, 8, 4, workers=0)
    fast, slow = ProxyProbe(qmodel, batches, "sqnr"), ProxyProbe(qmodel, batches, "sqnr", reuse=False)
    layers = list(quant.quant_layers(qmodel))
    for layer in layers[::7] + ["backbone.ERBlock_5.2.cspsppf.m", "neck.Bifusion0.cv3.block.conv"]:
        assert fast(layer) == slow(layer), layer
    assert fast.reuse is not None  # the self-check kept it on
    assert fast.baselines() == slow.baselines()


def test_reuse_that_disagrees_is_turned_off(tiny_val, caplog):
    qmodel = calibrated_tiny(tiny_detector(), tiny_val)
    batches, _ = proxy_batches(tiny_val["images"], SIZE, 4, 4, workers=0)
    probe, plain = ProxyProbe(qmodel, batches, "cosine"), ProxyProbe(qmodel, batches, "cosine", reuse=False)
    probe.prepare()
    layer = "detect.reg_preds.1"  # its input, reg_convs.1's output, comes from the records: corrupt it there,
    probe.reuse.records[0][id(qmodel.detect.reg_convs[1])][0][1].mul_(2.0)  # as an in-place op in a model would
    with caplog.at_level("WARNING"):
        assert probe(layer)["cosine_box"] == plain(layer)["cosine_box"]
    assert probe.reuse is None and any("turned off" in r.getMessage() for r in caplog.records)


def test_revert_reuse_replays_the_int8_pass_and_changes_nothing(tiny_val):
    qmodel = calibrated_tiny(tiny_detector(), tiny_val)
    batches, _ = proxy_batches(tiny_val["images"], SIZE, 8, 4, workers=0)
    fast = ProxyProbe(qmodel, batches, "mse", direction="revert")
    slow = ProxyProbe(qmodel, batches, "mse", reuse=False, direction="revert")
    layers = list(quant.quant_layers(qmodel))
    for layer in layers[::9] + ["detect.cls_preds.0"]:
        assert fast(layer) == slow(layer), layer
    assert fast.reuse is not None
