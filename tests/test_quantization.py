"""Tests for utils/quantization.py and utils/quant_compat.py: quantizer insertion keeps the float function, amax is
what the calibration methods define, layers switch on and off by name, calibrated models round-trip through our
checkpoint format, and a Q/DQ ONNX export matches PyTorch's fake quantization. CPU only, small inputs."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from models import build_model, load_config, load_model, read_checkpoint, reparameterize, save_checkpoint
from utils import quant_compat
from utils import quantization as quant
from utils.data import ImageFolderDataset, create_dataloader
from utils.errors import InputError
from utils.quant_compat import QuantDescriptor, TensorQuantizer, calib, device_safe, histogram

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
NEEDS_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="2.1.3's .cuda() calls only fail without CUDA")


def deployed(name: str, seed: int = 0) -> nn.Module:
    """A deployed model with seeded weights and non-zero prediction convs (YOLOv6 zero-initialises them)."""
    torch.manual_seed(seed)
    model = reparameterize(build_model(load_config(name)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in list(model.detect.cls_preds) + list(model.detect.reg_preds):
            conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=g))
    return model.eval()


def images(n: int = 2, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def yolov6n() -> nn.Module:
    return deployed("yolov6n")


@pytest.fixture(scope="module")
def reopt() -> nn.Module:
    return deployed("yolov6n_reopt")


@pytest.fixture(scope="module")
def calibrated(yolov6n: nn.Module) -> nn.Module:
    qmodel = quant.quantize_model(yolov6n)
    quant.calibrate(qmodel, [images(2, seed=1), images(2, seed=2)], num_batches=2, method="max")
    return qmodel


class Tiny(nn.Module):
    """Dilated and grouped convs, a max-pool, a transposed conv and a 1x1 conv: every swapped type."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=1, padding=2, dilation=2, groups=1, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.up(self.pool(x))))


def amax_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name)._amax


# ------------------------------------------------------------------------------------------------ insertion
def test_quantize_model_swaps_layers_of_a_copy(yolov6n):
    qmodel = quant.quantize_model(yolov6n)
    assert not quant.quant_layers(yolov6n), "the caller's model must stay float"
    swappable = [n for n, m in yolov6n.named_modules() if type(m) in (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)]
    assert list(quant.quant_layers(qmodel)) == [n for n in swappable if n != "detect.proj_conv"]
    assert type(qmodel.detect.proj_conv) is nn.Conv2d
    assert "backbone.ERBlock_2.0.rbr_reparam" in quant.quant_layers(qmodel)
    assert qmodel.backbone.stem.rbr_reparam.weight is not yolov6n.backbone.stem.rbr_reparam.weight
    for name, layer in quant.quant_layers(qmodel).items():
        assert layer.input_quantizer.axis is None, name
        if isinstance(layer, quant.quant_nn.QuantConvTranspose2d):
            assert layer.weight_quantizer.axis == (0,), name  # TensorRT's deconvolution axis
        elif isinstance(layer, quant.quant_nn.QuantConv2d):
            assert layer.weight_quantizer.axis == (0,), name


@pytest.mark.parametrize("name", ["yolov6n", "yolov6n_reopt"])
def test_disabled_quantizers_leave_outputs_unchanged(name, request):
    model = request.getfixturevalue({"yolov6n": "yolov6n", "yolov6n_reopt": "reopt"}[name])
    qmodel = quant.quantize_model(model)
    assert any(isinstance(m, quant.quant_nn.QuantConvTranspose2d) for m in qmodel.modules())
    quant.disable_all(qmodel)
    x = images()
    with torch.no_grad():
        assert torch.equal(qmodel(x), model(x))


def test_swap_copies_every_attribute():
    model = Tiny().eval()
    qmodel = quant.quantize_model(model, skip=())
    conv_attrs = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode", "output_padding", "transposed")
    for name in ("conv", "grouped", "up", "head"):
        old, new = model.get_submodule(name), qmodel.get_submodule(name)
        assert {a: getattr(new, a) for a in conv_attrs} == {a: getattr(old, a) for a in conv_attrs}, name
        assert (new.bias is None) == (old.bias is None)
    assert qmodel.grouped.groups == 4 and qmodel.grouped.dilation == (2, 2)
    pool_attrs = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
    assert {a: getattr(qmodel.pool, a) for a in pool_attrs} == {a: getattr(model.pool, a) for a in pool_attrs}
    quant.disable_all(qmodel)
    x = images(1, size=15)
    with torch.no_grad():
        assert torch.equal(qmodel(x), model(x))
    deconv = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2))
    qdeconv = quant.quantize_model(deconv, skip=())
    assert {a: getattr(qdeconv[0], a) for a in conv_attrs} == {a: getattr(deconv[0], a) for a in conv_attrs}
    quant.disable_all(qdeconv)
    with torch.no_grad():
        assert torch.equal(qdeconv(x[:, :1].expand(-1, 4, -1, -1)), deconv(x[:, :1].expand(-1, 4, -1, -1)))


def test_quantize_model_refuses_what_it_cannot_quantize(yolov6n):
    with pytest.raises(InputError, match="padding_mode 'reflect'"):
        quant.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")))
    with pytest.raises(InputError, match="deployed"):
        quant.quantize_model(build_model(load_config("yolov6n")))
    with pytest.raises(InputError, match="not modules of this model"):
        quant.quantize_model(yolov6n, skip=["backbone.no_such_layer"])
    with pytest.raises(InputError, match="already holds quantized layers"):
        quant.quantize_model(quant.quantize_model(yolov6n))
    with pytest.raises(InputError, match="max, percentile, entropy, mse"):
        quant.quantize_model(yolov6n, calib_method="minmax")
    skipped = quant.quantize_model(yolov6n, skip=["neck"])
    assert not any(name.startswith("neck.") for name in quant.quant_layers(skipped))


# --------------------------------------------------------------------------------------------- fake quant
def test_fake_quant_equals_hand_computation():
    amax = 2.0
    quantizer = TensorQuantizer(QuantDescriptor(num_bits=8, amax=amax))
    x = torch.tensor([-3.1, -2.0, -1.0, -0.004, 0.0, 0.3, 1.0, 1.99, 2.5, 7.0])
    scale = amax / 127
    expected = torch.clamp(torch.round(x / scale), -128, 127) * scale
    torch.testing.assert_close(quantizer(x), expected, rtol=1e-6, atol=1e-7)
    with quant.fb_fake_quant():
        torch.testing.assert_close(quantizer(x), expected, rtol=1e-6, atol=1e-7)


def test_fb_fake_quant_restores_the_flag():
    assert TensorQuantizer.use_fb_fake_quant is False
    with quant.fb_fake_quant():
        assert TensorQuantizer.use_fb_fake_quant is True
    with pytest.raises(RuntimeError), quant.fb_fake_quant():
        raise RuntimeError("boom")
    assert TensorQuantizer.use_fb_fake_quant is False


# ------------------------------------------------------------------------------------------------ calibration
def test_weight_amax_is_max_abs_per_output_channel():
    qmodel = quant.quantize_model(Tiny().eval(), skip=())
    quant.calibrate(qmodel, [images(1, size=16)], num_batches=1)
    conv_w, up_w = qmodel.grouped.weight.detach(), qmodel.up.weight.detach()
    assert torch.equal(amax_of(qmodel, "grouped._weight_quantizer"), conv_w.abs().amax(dim=(1, 2, 3)).view(-1, 1, 1, 1))
    # ConvTranspose2d weights are [in, out/groups, kh, kw]; TensorRT wants their scales per input channel (axis 0)
    assert torch.equal(amax_of(qmodel, "up._weight_quantizer"), up_w.abs().amax(dim=(1, 2, 3)).view(-1, 1, 1, 1))


def test_max_input_amax_is_the_largest_activation_seen():
    qmodel = quant.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), skip=())
    batches = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    summary = quant.calibrate(qmodel, batches, num_batches=2, method="max")
    expected = max(b.abs().max() for b in batches)
    assert float(amax_of(qmodel, "0._input_quantizer")) == float(expected)
    assert summary == {"method": "max", "batches": 2, "images": 4, "dead_amax": 0}


@pytest.mark.parametrize(("method", "percentile"), [("max", 99.99), ("percentile", 99.9), ("percentile", 99.99),
                                                    ("percentile", 99.999), ("entropy", 99.99), ("mse", 99.99)])
def test_every_method_gives_finite_positive_amax(method, percentile):
    model = Tiny().eval()
    qmodel = quant.quantize_model(model, skip=(), calib_method=method)
    batches = [images(2, seed=s, size=24) for s in (0, 1)]
    quant.calibrate(qmodel, batches, num_batches=2, method=method, percentile=percentile)
    reference = quant.quantize_model(model, skip=())
    quant.calibrate(reference, batches, num_batches=2, method="max")
    state, largest = quant.quantizer_state(qmodel), quant.quantizer_state(reference)
    assert len(state) == 9  # 5 input + 4 weight quantizers
    for name, amax in state.items():
        assert torch.isfinite(amax).all() and (amax > 0).all(), name
        assert (amax <= largest[name] * 1.001).all(), f"{name}: {method} amax above the observed max"
    with torch.no_grad():
        assert torch.isfinite(qmodel(batches[0])).all()


def test_calibration_is_deterministic_and_takes_the_first_batches(yolov6n):
    batches = [images(2, seed=s) for s in range(3)]
    states = []
    for loader in (batches, batches, batches[:2]):
        qmodel = quant.quantize_model(yolov6n)
        quant.calibrate(qmodel, loader, num_batches=2, method="percentile", percentile=99.9)
        states.append(quant.quantizer_state(qmodel))
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        assert all(torch.equal(other[k], states[0][k]) for k in states[0])


def test_recalibration_replaces_amax():
    qmodel = quant.quantize_model(Tiny().eval(), skip=())
    quant.calibrate(qmodel, [images(1, size=16)], num_batches=1, method="max")
    quant.calibrate(qmodel, [0.5 * images(1, size=16)], num_batches=1, method="percentile")
    amax = amax_of(qmodel, "conv._input_quantizer")
    assert amax.numel() == 1 and float(amax) <= 0.5


def test_items_marked_not_ok_are_left_out():
    qmodel = quant.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), skip=())
    good = images(1)
    batch = {"image": torch.cat([good, 100 * images(1, seed=5)]), "ok": [True, False]}
    summary = quant.calibrate(qmodel, [batch], num_batches=1)
    assert float(amax_of(qmodel, "0._input_quantizer")) == float(good.abs().max())
    assert summary["images"] == 1


def test_calibrates_from_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    loader = create_dataloader(ImageFolderDataset(tmp_path, img_size=32), batch_size=2, workers=0)
    qmodel = quant.quantize_model(Tiny().eval(), skip=())
    summary = quant.calibrate(qmodel, loader, num_batches=5)
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
    with caplog.at_level(logging.WARNING, logger="utils.quantization"):
        summary = quant.calibrate(qmodel, [images(2)], num_batches=1)
    warned = [r for r in caplog.records if r.name == "utils.quantization"]
    assert len(warned) == 1
    message = warned[0].getMessage()
    for part in ("first._weight_quantizer (1 of 4)", "zero._weight_quantizer (4 of 4)",
                 "last._input_quantizer (1 of 1)", "unused._input_quantizer (1 of 1)"):
        assert part in message
    assert summary["dead_amax"] == 1 + 4 + 1 + 1
    for name, amax in quant.quantizer_state(qmodel).items():
        assert torch.isfinite(amax).all() and (amax > 0).all(), name
    x = images(2)
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all() and torch.isfinite(qmodel.unused(x[:, :2])).all()
        with quant.fb_fake_quant():
            assert torch.isfinite(qmodel(x)).all()


# ---------------------------------------------------------------------------------------------- on / off
def test_quantize_only_set_quantized_and_count(yolov6n):
    qmodel = quant.quantize_model(yolov6n)
    names = list(quant.quant_layers(qmodel))
    total = len(names)
    assert quant.count_quantized(qmodel) == (total, total)
    quant.quantize_only(qmodel, names[:2])
    assert quant.count_quantized(qmodel) == (2, total)
    other = qmodel.get_submodule(names[5])
    assert other.input_quantizer._disabled and other.weight_quantizer._disabled
    assert [row["name"] for row in quant.layer_info(qmodel) if row["quantized"]] == names[:2]
    quant.set_quantized(qmodel, names[1], False)
    assert quant.count_quantized(qmodel) == (1, total)
    assert quant.float_layers(qmodel) == names[1:]
    quant.disable_all(qmodel)
    assert quant.count_quantized(qmodel) == (0, total)
    quant.enable_all(qmodel)
    assert quant.count_quantized(qmodel) == (total, total)
    with pytest.raises(InputError, match="backbone.stem.rbr_reparam") as err:
        quant.quantize_only(qmodel, [names[0], "backbone.nope"])
    assert "backbone.nope" in str(err.value)
    assert quant.count_quantized(qmodel) == (total, total), "a bad name must change nothing"


def test_layer_info_rows(yolov6n):
    qmodel = quant.quantize_model(yolov6n)
    rows = {row["name"]: row for row in quant.layer_info(qmodel)}
    stem = rows["backbone.stem.rbr_reparam"]
    assert stem["type"] == "QuantConv2d" and stem["weight_shape"] == [16, 3, 3, 3] and stem["params"] == 16 * 27 + 16
    pool = next(row for row in rows.values() if row["type"] == "QuantMaxPool2d")
    assert pool["weight_shape"] is None and pool["params"] == 0


def test_calibrate_rejects_bad_arguments(yolov6n):
    qmodel = quant.quantize_model(yolov6n)
    with pytest.raises(InputError, match="choose one of max, percentile, entropy, mse"):
        quant.calibrate(qmodel, [images()], 1, method="minmax")
    with pytest.raises(InputError, match="percentile"):
        quant.calibrate(qmodel, [images()], 1, method="percentile", percentile=150)
    with pytest.raises(InputError, match="positive integer"):
        quant.calibrate(qmodel, [images()], 0)
    with pytest.raises(InputError, match="quantize_model"):
        quant.calibrate(yolov6n, [images()], 1)
    with pytest.raises(InputError, match="no readable image"):
        quant.calibrate(qmodel, [{"image": images(1), "ok": [False]}], 1)


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
    quant.calibrate(qmodel, [images(2, size=16)], num_batches=1, method="mse")
    state = qmodel.state_dict()
    fresh = quant.quantize_model(model, skip=())
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):  # 2.1.3 creates the missing _amax with .cuda()
            quant.quantize_model(model, skip=()).load_state_dict(state)
    original = TensorQuantizer._load_from_state_dict
    with device_safe("cpu"):
        fresh.load_state_dict(state)
    assert TensorQuantizer._load_from_state_dict is original
    assert all(amax.device.type == "cpu" for amax in quant.quantizer_state(fresh).values())
    x = images(2, seed=3, size=16)
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))


def test_importing_keeps_the_root_logger():
    # pytorch-quantization's import replaces the root logger's stderr handlers by absl's and sets it to WARNING;
    # a script that set up logging first must keep its handlers and level (checked in a fresh interpreter)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "before = list(logging.root.handlers); import utils.quantization; "
            "assert logging.root.handlers == before, logging.root.handlers; "
            "assert logging.root.level == logging.INFO, logging.root.level")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_gives_bit_identical_outputs(calibrated, tmp_path):
    quant.set_quantized(calibrated, ["backbone.stem.rbr_reparam"], False)
    try:
        path = quant.save_calibrated(tmp_path / "calib.pt", calibrated, meta={"data": "random"})
        raw = torch.load(path, weights_only=True)
        assert raw["calib"]["method"] == "max" and raw["quant"]["float_layers"] == ["backbone.stem.rbr_reparam"]
        assert set(raw["quantizers"]) == set(quant.quantizer_state(calibrated))
        loaded = quant.load_calibrated(path)
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
    path = quant.save_calibrated(tmp_path / "calib.pt", calibrated)
    with pytest.raises(InputError, match="calibrated for another model"):
        quant.load_quantizers(quant.quantize_model(reopt), path)
    retrained = quant.quantize_model(deployed("yolov6n", seed=1))
    with pytest.raises(InputError, match="weight amax .* does not fit"):
        quant.load_quantizers(retrained, path)
    raw = torch.load(path, weights_only=True)
    other = quant.quantize_model(reopt)
    quant.calibrate(other, [images(1)], num_batches=1)
    raw["quantizers"] = quant.quantizer_state(other)
    torch.save(raw, tmp_path / "mixed.pt")
    with pytest.raises(InputError, match="calibrated for another model"):
        quant.load_calibrated(tmp_path / "mixed.pt")
    same = quant.load_quantizers(quant.quantize_model(deployed("yolov6n")), path)
    assert quant.quantizer_state(same).keys() == quant.quantizer_state(calibrated).keys()


def test_load_calibrated_rejects_other_files(yolov6n, tmp_path):
    plain = save_checkpoint(tmp_path / "float.pt", yolov6n, deployed=True)
    with pytest.raises(InputError, match="holds no quantizer state"):
        quant.load_calibrated(plain)
    with pytest.raises(InputError, match="not found"):
        quant.load_calibrated(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="calibrate the model"):
        quant.save_calibrated(tmp_path / "x.pt", quant.quantize_model(yolov6n))


# ---------------------------------------------------------------------------------------------------- ONNX
def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto:
    """The node that makes ``tensor``, looking through Identity nodes."""
    node = next(n for n in graph.node if tensor in n.output)
    return _producer(graph, node.input[0]) if node.op_type == "Identity" else node


def test_qdq_onnx_export_matches_pytorch(calibrated, tmp_path):
    path = tmp_path / "yolov6n_qdq.onnx"
    x = images(1, seed=9)
    with quant.fb_fake_quant(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values taken from tensors are expected
        torch.onnx.export(calibrated.eval(), (x,), str(path), dynamo=False, opset_version=13,
                          input_names=["images"], output_names=["outputs"])
        expected = calibrated(x)
    assert TensorQuantizer.use_fb_fake_quant is False
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 50
    deconv = next(n for n in graph.graph.node if n.op_type == "ConvTranspose")
    weight_dq = _producer(graph.graph, deconv.input[1])
    assert weight_dq.op_type == "DequantizeLinear"
    assert {a.name: a.i for a in weight_dq.attribute}.get("axis", 1) == 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (actual - expected).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert (actual - calibrated(x)).abs().max().item() <= 1e-4  # 2.1.3's own fake quant agrees too
