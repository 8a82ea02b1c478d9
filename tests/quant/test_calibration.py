"""Tests for utils/quant/calibration.py: amax is what each calibration method defines, calibration is
deterministic, dead channels stay finite, and calibrated models round-trip through our checkpoint format."""
from __future__ import annotations

import copy
import logging
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from models import load_model, read_checkpoint, save_checkpoint
from tests.helpers import Tiny, amax_of, deployed, images
from utils.data.coco import ImageFolderDataset, create_dataloader
from utils.errors import InputError
from utils.quant import calibration
from utils.quant import quantizers as quant
from utils.quant.compat import calib

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ calibration
def test_weight_amax_is_max_abs_per_output_channel():
    qmodel = quant.quantize_model(Tiny().eval(), skip=())
    calibration.calibrate(qmodel, [images(1, size=16)], num_batches=1)
    conv_w, up_w = qmodel.grouped.weight.detach(), qmodel.up.weight.detach()
    assert torch.equal(amax_of(qmodel, "grouped._weight_quantizer"), conv_w.abs().amax(dim=(1, 2, 3)).view(-1, 1, 1, 1))
    # ConvTranspose2d weights are [in, out/groups, kh, kw]; TensorRT wants their scales per input channel (axis 0)
    assert torch.equal(amax_of(qmodel, "up._weight_quantizer"), up_w.abs().amax(dim=(1, 2, 3)).view(-1, 1, 1, 1))


def test_max_input_amax_is_the_largest_activation_seen():
    qmodel = quant.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), skip=())
    batches = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    summary = calibration.calibrate(qmodel, batches, num_batches=2, method="max")
    expected = max(b.abs().max() for b in batches)
    assert float(amax_of(qmodel, "0._input_quantizer")) == float(expected)
    assert summary == {"method": "max", "batches": 2, "images": 4, "dead_amax": 0}


@pytest.mark.parametrize(("method", "percentile"), [("max", 99.99), ("percentile", 99.9), ("percentile", 99.99),
                                                    ("percentile", 99.999), ("entropy", 99.99), ("mse", 99.99)])
def test_every_method_gives_finite_positive_amax(method, percentile):
    model = Tiny().eval()
    qmodel = quant.quantize_model(model, skip=(), calib_method=method)
    batches = [images(2, seed=s, size=24) for s in (0, 1)]
    calibration.calibrate(qmodel, batches, num_batches=2, method=method, percentile=percentile)
    reference = quant.quantize_model(model, skip=())
    calibration.calibrate(reference, batches, num_batches=2, method="max")
    state, largest = calibration.quantizer_state(qmodel), calibration.quantizer_state(reference)
    assert len(state) == 9  # 5 input + 4 weight quantizers
    for name, amax in state.items():
        assert torch.isfinite(amax).all() and (amax > 0).all(), name
        assert (amax <= largest[name] * 1.001).all(), f"{name}: {method} amax above the observed max"
    with torch.no_grad():
        assert torch.isfinite(qmodel(batches[0])).all()


def test_entropy_stride_tries_only_every_kth_bin(monkeypatch):
    """With stride k the entropy amax is the upper edge of bin 128 + j*k (pytorch-quantization's search starts at
    bin 128); stride 1 is the plain entropy calibration, and the stride is recorded."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    x[0, 0, 0, :8] = 12.0  # a few outliers: entropy clips them, somewhere inside the histogram
    batches = [x]
    amax = {}
    with monkeypatch.context() as patch:
        patch.setattr(calib.HistogramCalibrator, "reset", lambda self: None)  # keep the histogram's bin edges
        for stride in (1, 16):
            qmodel = quant.quantize_model(model, skip=(), calib_method="entropy")
            summary = calibration.calibrate(qmodel, batches, 1, method="entropy", entropy_stride=stride)
            amax[stride] = float(amax_of(qmodel, "0._input_quantizer"))
            edges = qmodel[0].input_quantizer._calibrator._calib_bin_edges
            index = int(np.argmin(np.abs(edges - amax[stride])))
            assert np.isclose(edges[index], amax[stride]) and (index - 128) % stride == 0, (stride, index)
            assert summary.get("entropy_stride") == (None if stride == 1 else stride)
    assert amax[16] != amax[1]  # this input's best bin is not one stride 16 tries
    plain = quant.quantize_model(model, skip=(), calib_method="entropy")
    calibration.calibrate(plain, batches, 1, method="entropy")
    assert float(amax_of(plain, "0._input_quantizer")) == amax[1]
    with pytest.raises(InputError, match="entropy stride"):
        calibration.calibrate(plain, batches, 1, method="entropy", entropy_stride=0)


def test_calibration_is_deterministic_and_takes_the_first_batches(yolov6n):
    batches = [images(2, seed=s) for s in range(3)]
    states = []
    for loader in (batches, batches, batches[:2]):
        qmodel = quant.quantize_model(yolov6n)
        calibration.calibrate(qmodel, loader, num_batches=2, method="percentile", percentile=99.9)
        states.append(calibration.quantizer_state(qmodel))
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        assert all(torch.equal(other[k], states[0][k]) for k in states[0])


def test_recalibration_replaces_amax():
    qmodel = quant.quantize_model(Tiny().eval(), skip=())
    calibration.calibrate(qmodel, [images(1, size=16)], num_batches=1, method="max")
    calibration.calibrate(qmodel, [0.5 * images(1, size=16)], num_batches=1, method="percentile")
    amax = amax_of(qmodel, "conv._input_quantizer")
    assert amax.numel() == 1 and float(amax) <= 0.5


def test_items_marked_not_ok_are_left_out():
    qmodel = quant.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), skip=())
    good = images(1)
    batch = {"image": torch.cat([good, 100 * images(1, seed=5)]), "ok": [True, False]}
    summary = calibration.calibrate(qmodel, [batch], num_batches=1)
    assert float(amax_of(qmodel, "0._input_quantizer")) == float(good.abs().max())
    assert summary["images"] == 1


def test_calibrates_from_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    loader = create_dataloader(ImageFolderDataset(tmp_path, img_size=32), batch_size=2, workers=0)
    qmodel = quant.quantize_model(Tiny().eval(), skip=())
    summary = calibration.calibrate(qmodel, loader, num_batches=5)
    assert summary["batches"] == 2 and summary["images"] == 3


def test_dead_channels_and_unused_layers_get_a_tiny_amax(caplog):
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 4, 3, padding=1)
            self.zero = nn.Conv2d(4, 4, 1)
            self.last = nn.Conv2d(4, 2, 1)
            self.unused = nn.Conv2d(2, 2, 1)
            with torch.no_grad():
                self.first.weight[0].zero_()  # output channel 0: all-zero weights
                self.zero.weight.zero_()
                self.zero.bias.zero_()  # so the input of `last` is always zero

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last(torch.relu(self.zero(torch.relu(self.first(x)))))

    qmodel = quant.quantize_model(Dead().eval(), skip=())
    with caplog.at_level(logging.WARNING, logger="utils.quant.calibration"):
        summary = calibration.calibrate(qmodel, [images(2)], num_batches=1)
    warned = [r for r in caplog.records if r.name == "utils.quant.calibration"]
    assert len(warned) == 1
    message = warned[0].getMessage()
    for part in ("first._weight_quantizer (1 of 4)", "zero._weight_quantizer (4 of 4)",
                 "last._input_quantizer (1 of 1)", "unused._input_quantizer (1 of 1)"):
        assert part in message
    assert summary["dead_amax"] == 1 + 4 + 1 + 1
    for name, amax in calibration.quantizer_state(qmodel).items():
        assert torch.isfinite(amax).all() and (amax > 0).all(), name
    x = images(2)
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all() and torch.isfinite(qmodel.unused(x[:, :2])).all()
        with quant.fb_fake_quant():
            assert torch.isfinite(qmodel(x)).all()


def test_calibrate_rejects_bad_arguments(yolov6n):
    qmodel = quant.quantize_model(yolov6n)
    with pytest.raises(InputError, match="choose one of max, percentile, entropy, mse"):
        calibration.calibrate(qmodel, [images()], 1, method="minmax")
    with pytest.raises(InputError, match="percentile"):
        calibration.calibrate(qmodel, [images()], 1, method="percentile", percentile=150)
    with pytest.raises(InputError, match="positive integer"):
        calibration.calibrate(qmodel, [images()], 0)
    with pytest.raises(InputError, match="quantize_model"):
        calibration.calibrate(yolov6n, [images()], 1)
    with pytest.raises(InputError, match="no readable image"):
        calibration.calibrate(qmodel, [{"image": images(1), "ok": [False]}], 1)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_gives_bit_identical_outputs(calibrated, tmp_path):
    quant.set_quantized(calibrated, ["backbone.stem.rbr_reparam"], False)
    try:
        path = calibration.save_calibrated(tmp_path / "calib.pt", calibrated, meta={"data": "random"})
        raw = torch.load(path, weights_only=True)
        assert raw["calib"]["method"] == "max" and raw["quant"]["float_layers"] == ["backbone.stem.rbr_reparam"]
        assert set(raw["quantizers"]) == set(calibration.quantizer_state(calibrated))
        loaded = calibration.load_calibrated(path)
        x = images(2, seed=7)
        with torch.no_grad():
            assert torch.equal(loaded(x), calibrated(x))
        assert quant.count_quantized(loaded) == quant.count_quantized(calibrated)
        assert loaded.quant_calib == calibrated.quant_calib
    finally:
        quant.enable_all(calibrated)
    assert read_checkpoint(path).meta == {"data": "random"}
    float_model = load_model(path)  # the plain loader reads the same file as the float deployed model
    quant.disable_all(loaded)
    with torch.no_grad():
        assert torch.equal(float_model(x), loaded(x))


def test_loading_another_models_calibration_fails(calibrated, reopt, tmp_path):
    path = calibration.save_calibrated(tmp_path / "calib.pt", calibrated)
    with pytest.raises(InputError, match="calibrated for another model"):
        calibration.load_quantizers(quant.quantize_model(reopt), path)
    retrained = quant.quantize_model(deployed("yolov6n", seed=1))
    with pytest.raises(InputError, match="weight amax .* does not fit"):
        calibration.load_quantizers(retrained, path)
    raw = torch.load(path, weights_only=True)
    other = quant.quantize_model(reopt)
    calibration.calibrate(other, [images(1)], num_batches=1)
    raw["quantizers"] = calibration.quantizer_state(other)
    torch.save(raw, tmp_path / "mixed.pt")
    with pytest.raises(InputError, match="calibrated for another model"):
        calibration.load_calibrated(tmp_path / "mixed.pt")
    same = calibration.load_quantizers(quant.quantize_model(deployed("yolov6n")), path)
    assert calibration.quantizer_state(same).keys() == calibration.quantizer_state(calibrated).keys()


def test_load_calibrated_rejects_other_files(yolov6n, tmp_path):
    plain = save_checkpoint(tmp_path / "float.pt", yolov6n, deployed=True)
    with pytest.raises(InputError, match="holds no quantizer state"):
        calibration.load_calibrated(plain)
    with pytest.raises(InputError, match="not found"):
        calibration.load_calibrated(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="calibrate the model"):
        calibration.save_calibrated(tmp_path / "x.pt", quant.quantize_model(yolov6n))


# ------------------------------------------------------------------------------------ YOLOv6's calibration files
def _as_yolov6_calibration(qmodel: nn.Module, path, monkeypatch) -> None:
    """Write ``qmodel`` the way YOLOv6's partial-quantization tools save a calibration (``torch.save({'model':
    model_ptq})``): the whole model pickled, its own classes under ``yolov6.*``, pytorch-quantization's quantized
    modules, quantizers and histogram calibrators (numpy bins) as they are."""
    fake = types.ModuleType("yolov6.models.yolo")
    for name in ("yolov6", "yolov6.models", "yolov6.models.yolo"):
        monkeypatch.setitem(sys.modules, name, fake if name == "yolov6.models.yolo" else types.ModuleType(name))
    model = copy.deepcopy(qmodel)
    renamed: dict[type, type] = {}
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith(("torch.", "pytorch_quantization.")):
            continue
        if cls not in renamed:
            name = f"{cls.__name__}{len(renamed)}"
            renamed[cls] = type(name, (cls,), {"__module__": "yolov6.models.yolo", "__qualname__": name})
            setattr(fake, name, renamed[cls])
        module.__class__ = renamed[cls]
    for layer in quant.quant_layers(model).values():  # histograms left in the calibrators, as YOLOv6 leaves them
        calibrator = layer.input_quantizer._calibrator
        calibrator._calib_hist, calibrator._calib_bin_edges = np.arange(8.0), np.linspace(0, 1, 9)
    torch.save({"model": model}, path)


def test_yolov6_calibration_files_give_their_input_amax(yolov6n, reopt, tmp_path, monkeypatch, capsys):
    """The seed's --calib-weights file: read without running its code; its input amax, weight amax from the
    weights (YOLOv6 calibrates weights by per-channel max too); another model's file is refused."""
    calibrated = quant.quantize_model(yolov6n, calib_method="entropy")
    calibration.calibrate(calibrated, [images(2, seed=5)], num_batches=1, method="percentile")
    path = tmp_path / "yolov6n_calib.pt"
    _as_yolov6_calibration(calibrated, path, monkeypatch)
    monkeypatch.delitem(sys.modules, "yolov6.models.yolo")  # reading it must not need YOLOv6's code
    fresh, record = calibration.calibrated_model(yolov6n, calib_weights=path)
    expected, got = calibration.quantizer_state(calibrated), calibration.quantizer_state(fresh)
    assert got.keys() == expected.keys()
    for name, amax in expected.items():
        assert torch.equal(got[name].reshape(amax.shape), amax), name
    assert record["method"] == "yolov6-calib" and record["source"] == str(path)
    with torch.no_grad():
        x = images(1, seed=6)
        assert torch.equal(fresh(x), calibrated(x))
    with pytest.raises(InputError, match="calibrated for another model"):
        calibration.calibrated_model(reopt, calib_weights=path)
    with pytest.raises(InputError, match="without quantizer amax"):
        floats = tmp_path / "float_pickle.pt"
        _as_yolov6_calibration(yolov6n, floats, monkeypatch)
        calibration.calibrated_model(yolov6n, calib_weights=floats)
