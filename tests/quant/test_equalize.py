"""Input equalization and bias correction (utils.quant.equalize) against hand-computed values and the float model."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from models import load_model
from tests.helpers import SHARED_FIXTURES, Tiny, deployed, images, shared_fixture
from utils.data.calibration import calibration_loader
from utils.errors import InputError
from utils.quant import calibration, equalize
from utils.quant import quantizers as quant
from utils.quant.compat import fake_tensor_quant

REAL_LITE = SHARED_FIXTURES / "yolov6lite-coco" / "yolov6lite_s_coco_fused.pt"
REAL_TRAIN = SHARED_FIXTURES / "coco-real" / "train"


def _float_outputs(qmodel: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with quant.float_pass(qmodel), torch.no_grad():
        return qmodel.eval()(x)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / a.detach().abs().max())


@pytest.fixture(scope="module")
def lite() -> nn.Module:
    return deployed("yolov6lite_s")


# --------------------------------------------------------------------------------------------- scales
def test_depthwise_scale_is_the_range_ratio_to_the_alpha():
    layer = quant.quantize_model(nn.Sequential(nn.Conv2d(3, 3, 3, groups=3)))[0]
    ranges = torch.tensor([1.0, 2.0, 4.0])
    assert torch.allclose(equalize.equalization_scale(layer, ranges, 1.0), torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(equalize.equalization_scale(layer, ranges, 0.5), torch.tensor([0.5, 0.5 ** 0.5, 1.0]))
    # dead channels keep 1, tiny ones stop at the floor
    ranges = torch.tensor([0.0, 1e-9, 4.0])
    assert torch.allclose(equalize.equalization_scale(layer, ranges, 1.0), torch.tensor([1.0, equalize.MIN_SCALE,
                                                                                         1.0]))


def test_regular_conv_scale_is_smoothquants_balance():
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0]], [[4.0]]]]))  # w_c = 1, 4
    layer = quant.quantize_model(nn.Sequential(conv))[0]
    ranges = torch.tensor([16.0, 1.0])
    # a^0.5 / w^0.5 = [4, 0.5] -> normalised to max 1
    assert torch.allclose(equalize.equalization_scale(layer, ranges, 0.5), torch.tensor([1.0, 0.125]))
    assert torch.allclose(equalize.equalization_scale(layer, ranges, 1.0), torch.tensor([1.0, 1 / 16]))


def test_channel_ranges_match_numpy():
    torch.manual_seed(0)
    model = quant.quantize_model(nn.Sequential(nn.Conv2d(3, 3, 1)))
    batches = [torch.randn(2, 3, 16, 16) * torch.tensor([1.0, 5.0, 0.1])[None, :, None, None] for _ in range(3)]
    data = torch.cat(batches).abs().transpose(0, 1).reshape(3, -1).numpy()
    layers = quant.quant_layers(model)
    maxima = equalize.channel_ranges(model, layers, batches, 100.0)["0"]
    assert np.allclose(maxima.numpy(), data.max(axis=1))
    p99 = equalize.channel_ranges(model, layers, batches, 99.0)["0"].numpy()
    # the smallest value whose empirical CDF reaches 99 %, rounded up to the edge of its histogram bin
    expected = np.percentile(data, 99.0, axis=1, method="inverted_cdf")
    bin_width = data.max(axis=1) / 2048
    assert np.all(p99 >= expected - 1e-6) and np.all(p99 <= expected + 1.001 * bin_width)


# --------------------------------------------------------------------------------------- float function
@pytest.mark.parametrize("kinds", [("depthwise",), ("depthwise", "conv")])
def test_equalized_lite_computes_the_same_float_function(lite, kinds):
    x = images(2, size=128)
    qmodel = quant.quantize_model(lite)
    record = equalize.equalize(qmodel, [images(2, seed=3, size=128)], kinds, alpha=0.5)
    assert set(record["scales"]) == {n for n, m in quant.quant_layers(qmodel).items()
                                     if equalize.layer_kind(m) in kinds}
    assert _relative(lite(x), _float_outputs(qmodel, x)) < 1e-5


def test_grouped_conv_weights_take_the_scale_of_their_group():
    model = Tiny().eval()
    qmodel = quant.quantize_model(model)
    x = images(2, size=32)
    record = equalize.equalize(qmodel, [images(2, seed=5, size=32)], ("conv",), alpha=0.5, fold=False)
    assert "grouped" in record["scales"] and record["scales"]["grouped"].min() < 0.9
    assert _relative(model(x), _float_outputs(qmodel, x)) < 1e-5


def test_relu_producers_take_the_inverse_scale_instead_of_a_multiply(yolov6n):
    qmodel = quant.quantize_model(yolov6n)
    record = equalize.equalize(qmodel, [images(2, seed=3)], ("conv",), alpha=0.5)
    # ERBlock_2.0 reads stem's ReLU output and nothing else does: folded into the stem's output channels
    assert record["folded"]["backbone.ERBlock_2.0.rbr_reparam"] == "backbone.stem.rbr_reparam"
    assert "backbone.ERBlock_2.0.rbr_reparam" not in equalize.equalized_layers(qmodel)
    stem = quant.quant_layers(qmodel)["backbone.stem.rbr_reparam"]
    s = record["scales"]["backbone.ERBlock_2.0.rbr_reparam"]
    original = yolov6n.get_submodule("backbone.stem.rbr_reparam")
    assert torch.allclose(stem.bias, original.bias / s, rtol=1e-6, atol=1e-7)
    x = images(2, seed=7)
    assert _relative(yolov6n(x), _float_outputs(qmodel, x)) < 1e-5


def test_a_tensor_with_two_readers_is_never_folded(lite):
    qmodel = quant.quantize_model(lite)
    folded = equalize.foldable_producers(qmodel, quant.quant_layers(qmodel), img_size=128)
    # an S2 block's input feeds both its branches (conv_dw_1 and conv_pw_2): neither may fold into the producer
    assert not any(name.startswith("backbone.lite_effiblock_2.0.conv_dw_1") for name in folded)
    assert not any(name.startswith("backbone.lite_effiblock_2.0.conv_pw_2") for name in folded)
    # an S2 block's first branch: conv_1 reads the depthwise conv's output (no activation) alone
    assert folded["backbone.lite_effiblock_2.0.conv_1.block.conv"] == "backbone.lite_effiblock_2.0.conv_dw_1.block.conv"


def test_the_real_lite_s_keeps_its_float_outputs_on_real_images():
    model = load_model(shared_fixture(REAL_LITE))
    loader = calibration_loader(shared_fixture(REAL_TRAIN), 320, 4, 1, workers=0)
    batches = equalize.calibration_batches(loader, 1, torch.device("cpu"))
    x = batches[0]
    with torch.no_grad():
        ref = model(x)
    qmodel = quant.quantize_model(model)
    equalize.equalize(qmodel, batches, ("depthwise", "conv"), alpha=1.0)
    # float32: the transform only reorders roundings (||diff|| / ||out||)
    assert float((ref - _float_outputs(qmodel, x)).norm() / ref.norm()) < 1e-5
    # float64 throughout (weights scaled in float64 too): the same function to the last digits
    double = model.double()
    qdouble = quant.quantize_model(double)
    equalize.equalize(qdouble, [b.double() for b in batches], ("depthwise", "conv"), alpha=1.0)
    with torch.no_grad():
        assert _relative(double(x.double()), _float_outputs(qdouble, x.double())) < 1e-9


# --------------------------------------------------------------------------------- what INT8 then computes
def test_depthwise_equalization_is_per_channel_input_quantization():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 4, 8, 8) * torch.tensor([0.2, 1.0, 3.0, 9.0])[None, :, None, None]
    qmodel = quant.quantize_model(model)
    record = equalize.equalize(qmodel, [x], ("depthwise",), alpha=1.0, percentile=100.0)
    a = x.abs().amax(dim=(0, 2, 3))
    layer = qmodel[0]
    calibration.calibrate(qmodel, [x], 1, method="max")
    assert torch.allclose(layer.input_quantizer._amax.flatten(), a.max(), rtol=1e-6)
    # independent truth: per-channel input quantization with amax a_c, per-channel weights, plain conv
    x_q = fake_tensor_quant(x, a.view(1, -1, 1, 1))
    w_amax = conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    w_q = fake_tensor_quant(conv.weight.detach(), w_amax)
    expected = nn.functional.conv2d(x_q, w_q, conv.bias, padding=1, groups=4)
    with torch.no_grad():
        got = qmodel(x)
    assert torch.allclose(record["scales"]["0"], a / a.max())
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- bias
def test_bias_correction_removes_each_layers_mean_output_shift(yolov6n):
    qmodel = quant.quantize_model(yolov6n)
    batches = [images(2, seed=1), images(2, seed=2)]
    calibration.calibrate(qmodel, batches, 2, method="max")
    layer_name = "backbone.ERBlock_3.0.rbr_reparam"
    layer = quant.quant_layers(qmodel)[layer_name]
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with quant.float_pass(qmodel), torch.no_grad():
        for x in batches:
            qmodel(x)
    handle.remove()

    def outputs(quantized: bool) -> torch.Tensor:
        with torch.no_grad(), (contextlib.nullcontext() if quantized else quant.float_pass(qmodel)):
            return torch.cat([layer(x) for x in inputs])

    float_before = outputs(False)
    before = (outputs(True) - float_before).mean(dim=(0, 2, 3))
    assert before.abs().max() > 1e-4  # there is a shift to correct
    bias = layer.bias.detach().clone()
    shifts = equalize.correct_bias(qmodel, batches)
    assert torch.allclose(shifts[layer_name], before, atol=1e-6)
    assert torch.allclose(layer.bias, bias - before, atol=1e-6)
    # the INT8 output's mean per channel is now the float layer's (as it was before the correction)
    after = (outputs(True) - float_before).mean(dim=(0, 2, 3))
    assert after.abs().max() < 0.05 * before.abs().max()


def test_a_bias_correction_lasts_only_while_its_layer_runs_int8(yolov6n, tmp_path):
    qmodel = quant.quantize_model(yolov6n)
    batches = [images(2, seed=1), images(2, seed=2)]
    calibration.calibrate(qmodel, batches, 2, method="max")
    x = images(2, seed=3)
    layers = {n: m for n, m in quant.quant_layers(qmodel).items() if getattr(m, "bias", None) is not None}
    float_bias = {name: layer.bias.detach().clone() for name, layer in layers.items()}
    with torch.no_grad():
        float_out = yolov6n(x)
    shifts = equalize.correct_bias(qmodel, batches)
    kept_float, int8 = "backbone.ERBlock_3.0.rbr_reparam", "backbone.ERBlock_4.0.rbr_reparam"
    quant.float_only(qmodel, [kept_float])
    assert torch.equal(layers[kept_float].bias, float_bias[kept_float])  # its own float bias back
    assert torch.allclose(layers[int8].bias, float_bias[int8] - shifts[int8], atol=1e-7)
    with quant.float_pass(qmodel), torch.no_grad():  # the float reference is the float model's, not a corrected one
        assert torch.allclose(qmodel(x), float_out, atol=1e-5)
    assert torch.allclose(layers[int8].bias, float_bias[int8] - shifts[int8], atol=1e-7)  # restored afterwards
    quant.disable_all(qmodel)
    assert all(torch.allclose(layer.bias, float_bias[n], atol=1e-7) for n, layer in layers.items())
    quant.float_only(qmodel, [kept_float])
    with torch.no_grad():
        expected = qmodel(x)
        again = calibration.load_calibrated(calibration.save_calibrated(tmp_path / "partial.pt", qmodel))
        assert torch.allclose(again(x), expected, atol=1e-5)
    assert quant.float_layers(again) == [kept_float]
    assert torch.allclose(quant.quant_layers(again)[kept_float].bias, float_bias[kept_float], atol=1e-7)


# ----------------------------------------------------------------------------------------- checkpoints
def _calibrated_equalized(model: nn.Module, folder, bias_correction: bool = False):
    loader = calibration_loader(folder, 64, 2, 2, workers=0)
    settings = equalize.TransformSettings("all", alpha=0.5, bias_correction=bias_correction)
    return calibration.calibrated_model(model, loader=loader, batch_number=2, transform=settings)


def test_calibrated_file_rebuilds_the_same_model(lite, tiny_val, tmp_path):
    qmodel, record = _calibrated_equalized(lite, tiny_val["images"], bias_correction=True)
    assert record["transform"]["equalize"]["layers"] > 0 and record["transform"]["bias_correction"]["layers"] > 0
    path = calibration.save_calibrated(tmp_path / "eq.pt", qmodel)
    x = images(2, seed=9)
    with torch.no_grad():
        expected = qmodel(x)
        assert torch.equal(calibration.load_calibrated(path)(x), expected)
        # the same file applied to the original float weights (--calib-weights)
        again, again_record = calibration.calibrated_model(lite, calib_weights=path)
        assert torch.allclose(again(x), expected, atol=1e-5)
    assert again_record["amax_sha256"] == record["amax_sha256"]
    assert set(equalize.equalized_layers(again)) == set(equalize.equalized_layers(qmodel))


def test_another_models_equalized_file_is_refused(lite, tiny_val, tmp_path):
    qmodel, _ = _calibrated_equalized(lite, tiny_val["images"])
    path = calibration.save_calibrated(tmp_path / "eq.pt", qmodel)
    with pytest.raises(InputError, match="another model"):
        calibration.calibrated_model(deployed("yolov6lite_s", seed=1), calib_weights=path)
    with pytest.raises(InputError, match="another model"):
        calibration.calibrated_model(deployed("yolov6n"), calib_weights=path)
    with pytest.raises(InputError, match="brings its own"):
        calibration.calibrated_model(lite, calib_weights=path, transform=equalize.TransformSettings("depthwise"))


def test_auto_keeps_the_setting_closest_to_float(lite, tiny_val):
    loader = calibration_loader(tiny_val["images"], 64, 2, 2, workers=0)
    qmodel, record = calibration.calibrated_model(lite, loader=loader, batch_number=2,
                                                  transform=equalize.TransformSettings("auto", alpha=0.5))
    chosen = qmodel.quant_transform["equalize"]["selected_by"]
    assert set(chosen["scores"]) == {"none", "depthwise", "all"}
    assert chosen["setting"] == max(chosen["scores"], key=chosen["scores"].get)
    kinds = {"none": [], "depthwise": ["depthwise"], "all": ["depthwise", "conv"]}[chosen["setting"]]
    assert qmodel.quant_transform["equalize"]["kinds"] == kinds


@pytest.mark.parametrize("bad", [{"equalize": "everything"}, {"alpha": 1.5}, {"percentile": 0.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InputError):
        equalize.TransformSettings(**bad)


@pytest.mark.parametrize("fixture", ["yolov6n_v3_official_random.pt", "yolov6n_reopt_v2_official_random.pt",
                                     "yolov6lite_m_official_random.pt"])
def test_official_release_files_keep_their_float_function(fixture):
    """YOLOv6's own checkpoint formats (random weights: correctness only; what equalization buys on a trained v3
    model cannot be measured without real v3 weights): every conv equalized, float64 outputs unchanged."""
    model = load_model(shared_fixture(SHARED_FIXTURES / "yolov6-official" / fixture)).double()
    x = images(2, seed=4, size=128).double()
    qmodel = quant.quantize_model(model)
    record = equalize.equalize(qmodel, [images(2, seed=5, size=128).double()], equalize.KINDS, alpha=0.5)
    assert len(record["scales"]) == sum(equalize.layer_kind(m) is not None for m in quant.quant_layers(qmodel).values())
    if "lite" not in fixture:  # RepVGG blocks end in ReLU: most inputs fold into their producer
        assert len(record["folded"]) > len(record["scales"]) // 3
    with torch.no_grad():
        assert _relative(model(x), _float_outputs(qmodel, x)) < 1e-9


def test_an_equalized_input_leaves_its_sharing_group(lite):
    from utils.quant.sharing import trace_sharing_groups

    qmodel = quant.quantize_model(lite)
    pair = {"backbone.lite_effiblock_2.0.conv_dw_1.block.conv", "backbone.lite_effiblock_2.0.conv_pw_2.block.conv"}
    assert any(pair <= set(group) for group in trace_sharing_groups(qmodel, img_size=128))  # one tensor, two readers
    equalize.equalize(qmodel, [images(2, seed=3, size=128)], ("depthwise",))
    groups = trace_sharing_groups(qmodel, img_size=128)
    # the depthwise reader now quantizes x / s, another tensor: no scale to agree on
    assert not any("backbone.lite_effiblock_2.0.conv_dw_1.block.conv" in group for group in groups)
