"""Tests for utils/quant/amax_choice.py and ``calibrate(method="auto")``: the candidates are what each calibrator
gives, the assignment with the best head error wins, and each quantizer ends with its chosen candidate's amax."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models import reparameterize
from tests.helpers import SIZE, tiny_detector
from utils.data.calibration import calibration_loader
from utils.inference.output_error import DetectionError
from utils.quant import calibration
from utils.quant import quantizers as quant
from utils.quant.amax_choice import CANDIDATES, PER_LAYER, candidate_amax
from utils.quant.compat import calib, device_safe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_candidates_of_a_long_tailed_tensor():
    """max is the exact largest |x|; the percentiles are numpy's within one histogram bin; entropy and mse clip the
    two outliers (below max) but not the bulk (above its 99.9th percentile)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200_000, generator=gen), torch.tensor([40.0, -55.0])])
    calibrator = calib.HistogramCalibrator(8, None, False)
    calibrator.collect(x)
    with device_safe(torch.device("cpu")):
        values = candidate_amax(calibrator, float(x.abs().max()))
    assert set(values) == set(CANDIDATES) and values["max"] == 55.0
    width = 55.0 / 2048
    for p in (99.9, 99.99, 99.999):
        assert abs(values[f"percentile-{p}"] - np.percentile(x.abs().numpy(), p)) <= 1.5 * width
    for name in ("entropy", "mse"):
        assert values["percentile-99.9"] < values[name] < 50.0, name
    empty = candidate_amax(calib.HistogramCalibrator(8, None, False), 0.0)
    assert all(np.isnan(v) for v in empty.values())


@pytest.fixture(scope="module")
def auto_model(tiny_val):
    model = reparameterize(tiny_detector())
    qmodel = quant.quantize_model(model, calib_method="auto")
    loader = calibration_loader(tiny_val["images"], SIZE, 4, 2, workers=0)
    summary = calibration.calibrate(qmodel, loader, 2, method="auto", auto_images=8, entropy_stride=16)
    return model, qmodel, summary, loader


def _head_sqnr(qmodel, batches) -> float:
    error = DetectionError()
    with torch.no_grad():
        quant.disable_all(qmodel)
        refs = [qmodel(x) for x in batches]
        quant.enable_all(qmodel)
        for x, ref in zip(batches, refs, strict=True):
            error.update(ref, qmodel(x))
    return error.head("sqnr")


def test_auto_applies_the_best_scored_assignment(auto_model):
    model, qmodel, summary, loader = auto_model
    record = summary["auto"]
    assert set(record["scores"]) == {*CANDIDATES, PER_LAYER}
    assert record["selected"] == max(record["scores"], key=record["scores"].get)
    batches = [b["image"] for b in loader]
    assert _head_sqnr(qmodel, batches) == pytest.approx(record["scores"][record["selected"]], abs=1e-5)
    assert sum(record["counts"].values()) == len(quant.quant_layers(qmodel)) == len(record["choice"])
    # the "max" assignment is exactly what the max calibrator gives: same score measured independently
    reference = quant.quantize_model(model)
    calibration.calibrate(reference, loader, 2, method="max")
    assert _head_sqnr(reference, batches) == pytest.approx(record["scores"]["max"], abs=1e-5)


def test_each_quantizer_gets_its_chosen_calibrators_amax(auto_model):
    """Independent truth: calibrate the same model with each single calibrator the choice names."""
    model, qmodel, summary, loader = auto_model
    choice = summary["auto"]["choice"]
    checked = 0
    for name, (method, percentile) in CANDIDATES.items():
        layers = [layer for layer, c in choice.items() if c == name]
        if not layers or method == "entropy":  # entropy ran with a coarser search stride here
            continue
        reference = quant.quantize_model(model, calib_method=method)
        calibration.calibrate(reference, loader, 2, method=method, percentile=percentile or 99.99)
        for layer in layers:
            got = float(qmodel.get_submodule(layer).input_quantizer._amax)
            want = float(reference.get_submodule(layer).input_quantizer._amax)
            assert got == pytest.approx(want, rel=1e-6), (layer, name)
            checked += 1
    assert checked > 0


def test_auto_calibration_round_trips_with_its_choice(auto_model, tmp_path):
    _, qmodel, summary, loader = auto_model
    path = calibration.save_calibrated(tmp_path / "auto.pt", qmodel)
    loaded = calibration.load_calibrated(path)
    assert loaded.quant_calib["auto"]["choice"] == summary["auto"]["choice"]
    x = next(iter(loader))["image"]
    with torch.no_grad():
        assert torch.equal(loaded(x), copy.deepcopy(qmodel)(x))
    fresh, record = calibration.calibrated_model(reparameterize(tiny_detector()), calib_weights=path)
    assert record["method"] == "auto" and record["auto"]["selected"] == summary["auto"]["selected"]
