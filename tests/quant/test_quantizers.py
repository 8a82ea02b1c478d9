"""Tests for utils/quant/quantizers.py: quantizer insertion keeps the float function and every layer attribute,
fake quantization equals the hand computation, layers switch on and off by name. CPU only, small inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model, load_config
from tests.helpers import Tiny, images
from utils.errors import InputError
from utils.quant import quantizers as quant
from utils.quant.compat import QuantDescriptor, TensorQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


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
