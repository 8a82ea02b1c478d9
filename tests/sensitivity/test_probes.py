"""Tests for utils/sensitivity/probes.py: a proxy sees a layer whose amax clips everything as more sensitive."""
from __future__ import annotations

import pytest

from tests.helpers import SIZE, calibrated_tiny, tiny_detector
from utils.data.calibration import proxy_batches
from utils.quant import quantizers as quant
from utils.sensitivity.metrics import (
    PROXY_METHODS,
)
from utils.sensitivity.probes import ProxyProbe

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
