"""Tests for utils/quant/compat.py: pytorch-quantization 2.1.3's CPU fixes compute what the library computes on
CUDA, are undone afterwards, and importing keeps the root logger."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, Tiny, images
from utils.quant import calibration
from utils.quant import compat as quant_compat
from utils.quant import quantizers as quant
from utils.quant.compat import TensorQuantizer, calib, device_safe, histogram

pytestmark = pytest.mark.usefixtures("one_thread")


NEEDS_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="2.1.3's .cuda() calls only fail without CUDA")


# ------------------------------------------------------------------------------------- compat (2.1.3 on CPU)
def _histogram_calibrator() -> calib.HistogramCalibrator:
    calibrator = calib.HistogramCalibrator(8, None, False)
    g = torch.Generator().manual_seed(0)
    calibrator.collect(torch.randn(4, 8, 16, 16, generator=g))
    calibrator.collect(1.5 * torch.randn(4, 8, 16, 16, generator=g))
    return calibrator


def test_mse_search_matches_the_library_on_cpu(monkeypatch):
    calibrator = _histogram_calibrator()
    hist, edges = calibrator._calib_hist.int().numpy(), calibrator._calib_bin_edges.numpy()
    ours = quant_compat.compute_amax_mse(hist, edges, 8, False)
    with monkeypatch.context() as patch:  # the library's own search, with its .cuda() made a no-op
        patch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
        reference = histogram._compute_amax_mse(hist, edges, 8, False)
    assert torch.isfinite(ours) and float(ours) > 0
    assert torch.equal(ours, reference.cpu())
    with device_safe():
        assert torch.equal(calibrator.compute_amax("mse"), ours)
    assert histogram._compute_amax_mse is not quant_compat.compute_amax_mse, "the patch must be undone"


@NEEDS_CPU_ONLY
def test_library_mse_needs_the_compat_fix_on_cpu():
    original = histogram._compute_amax_mse
    with pytest.raises((AssertionError, RuntimeError)):  # "Torch not compiled with CUDA enabled"
        _histogram_calibrator().compute_amax("mse")
    with pytest.raises(ValueError), device_safe():
        raise ValueError("boom")
    assert histogram._compute_amax_mse is original


def test_amax_state_loads_into_a_fresh_model_on_cpu():
    model = Tiny().eval()
    qmodel = quant.quantize_model(model, skip=())
    calibration.calibrate(qmodel, [images(2, size=16)], num_batches=1, method="mse")
    state = qmodel.state_dict()
    fresh = quant.quantize_model(model, skip=())
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):  # 2.1.3 creates the missing _amax with .cuda()
            quant.quantize_model(model, skip=()).load_state_dict(state)
    original = TensorQuantizer._load_from_state_dict
    with device_safe("cpu"):
        fresh.load_state_dict(state)
    assert TensorQuantizer._load_from_state_dict is original
    assert all(amax.device.type == "cpu" for amax in calibration.quantizer_state(fresh).values())
    x = images(2, seed=3, size=16)
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))


def test_importing_keeps_the_root_logger():
    # pytorch-quantization's import replaces the root logger's stderr handlers by absl's and sets it to WARNING;
    # a script that set up logging first must keep its handlers and level (checked in a fresh interpreter)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "before = list(logging.root.handlers); import utils.quant.quantizers, utils.quant.calibration; "
            "assert logging.root.handlers == before, logging.root.handlers; "
            "assert logging.root.level == logging.INFO, logging.root.level")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
