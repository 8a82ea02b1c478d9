"""Tests for utils/quant/sharing.py: groups traced from v2 RepOpt and v3 layouts equal YOLOv6's own hand-written
list / the architecture, and shared amax is the max over each group's INT8 members."""
from __future__ import annotations

import pytest
import torch

from models import build_model, load_config, reparameterize
from utils.quant import calibration
from utils.quant import quantizers as quant
from utils.quant.sharing import input_amax, share_input_amax, trace_sharing_groups

pytestmark = pytest.mark.usefixtures("one_thread")


# YOLOv6's tools/partial_quantization/partial_quant.py lists, by hand, the layers of yolov6s_reopt (v2 RepOpt)
# whose amax it fuses (its extra upsample_feat quantizers aside); the detect stems read the same tensor as the
# downsample convs, which that list leaves out.
REOPT_GROUPS = [
    ["backbone.ERBlock_4.0.conv", "neck.Rep_p3.conv1.conv"],
    ["backbone.ERBlock_5.0.conv", "neck.Rep_p4.conv1.conv"],
    ["backbone.ERBlock_5.2.cv2.conv", "backbone.ERBlock_5.2.m"],
    ["neck.Rep_n3.conv1.conv", "neck.upsample1.upsample_transpose"],
    ["neck.Rep_n4.conv1.conv", "neck.upsample0.upsample_transpose"],
    ["neck.downsample2.conv", "detect.stems.0.conv"],
    ["neck.downsample1.conv", "detect.stems.1.conv"],
    ["detect.cls_convs.0.conv", "detect.reg_convs.0.conv"],
    ["detect.cls_convs.1.conv", "detect.reg_convs.1.conv"],
    ["detect.cls_convs.2.conv", "detect.reg_convs.2.conv"],
]


# v3 (EfficientRep + RepBiFPANNeck + CSPSPPF), from the architecture: BiFusion concatenates the upsampled feature
# with cv1(C_i) and the downsampled cv2(C_{i-1}), so each backbone stage output is read by the next stage and by
# BiFusion convs; CSPSPPF's cv1 and cv2 read one tensor, its maxpool chain is concatenated before cv5.
V3_GROUPS = [
    ["backbone.ERBlock_3.0.rbr_reparam", "neck.Bifusion1.cv2.block.conv"],
    ["backbone.ERBlock_4.0.rbr_reparam", "neck.Bifusion0.cv2.block.conv", "neck.Bifusion1.cv1.block.conv"],
    ["backbone.ERBlock_5.0.rbr_reparam", "neck.Bifusion0.cv1.block.conv"],
    ["backbone.ERBlock_5.2.cspsppf.cv1.block.conv", "backbone.ERBlock_5.2.cspsppf.cv2.block.conv"],
    ["backbone.ERBlock_5.2.cspsppf.m", "backbone.ERBlock_5.2.cspsppf.cv5.block.conv"],
    ["neck.Bifusion0.upsample.upsample_transpose", "neck.Rep_n4.conv1.rbr_reparam"],
    ["neck.Bifusion1.upsample.upsample_transpose", "neck.Rep_n3.conv1.rbr_reparam"],
    ["neck.downsample2.block.conv", "detect.stems.0.block.conv"],
    ["neck.downsample1.block.conv", "detect.stems.1.block.conv"],
    ["detect.cls_convs.0.block.conv", "detect.reg_convs.0.block.conv"],
    ["detect.cls_convs.1.block.conv", "detect.reg_convs.1.block.conv"],
    ["detect.cls_convs.2.block.conv", "detect.reg_convs.2.block.conv"],
]

# YOLOv6Lite-S, from the architecture: an S2 block's two branches (conv_dw_1, conv_pw_2) read the block input, which
# for stages 3 and 4 is also a backbone output reduced by the neck; each CSPBlock's conv_1 / conv_2 read one input,
# Csp_n4's concat includes the reduced top feature that p6_conv_1 also reads; each head stem reads a neck output
# that a downsampling DPBlock also reads (P3, P4, P5), and cls/reg convs read the stem. SE convs, split halves and
# DarknetBlock chains read tensors of their own.
LITE_GROUPS = [
    *[[f"backbone.lite_effiblock_{i}.0.conv_dw_1.block.conv", f"backbone.lite_effiblock_{i}.0.conv_pw_2.block.conv"]
      + ([f"neck.reduce_layer{5 - i}.block.conv"] if i in (3, 4) else []) for i in range(1, 5)],
    *[[f"neck.{csp}.conv_1.block.conv", f"neck.{csp}.conv_2.block.conv"] for csp in ("Csp_p4", "Csp_p3", "Csp_n3")],
    ["neck.Csp_n4.conv_1.block.conv", "neck.Csp_n4.conv_2.block.conv", "neck.p6_conv_1.conv_dw_1"],
    ["neck.downsample2.conv_dw_1", "detect.stems.0.conv_dw_1"],
    ["neck.downsample1.conv_dw_1", "detect.stems.1.conv_dw_1"],
    ["neck.p6_conv_2.conv_dw_1", "detect.stems.2.conv_dw_1"],
    *[[f"detect.cls_convs.{i}.conv_dw_1", f"detect.reg_convs.{i}.conv_dw_1"] for i in range(4)],
]


def _quantized(config: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return quant.quantize_model(reparameterize(build_model(load_config(config)).eval()))


# ------------------------------------------------------------------------------------------------------ sharing
@pytest.mark.parametrize("config, expected", [("yolov6n_reopt", REOPT_GROUPS), ("yolov6n", V3_GROUPS),
                                              ("yolov6lite_s", LITE_GROUPS)])
def test_sharing_groups_are_traced_from_the_model(config, expected):
    groups = trace_sharing_groups(_quantized(config))
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected))


def test_shared_amax_is_the_max_over_int8_members_and_follows_the_float_set():
    model = _quantized("yolov6n")
    calibration.calibrate(model, [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))], 1)
    calibrated = input_amax(model)
    group = ["backbone.ERBlock_4.0.rbr_reparam", "neck.Bifusion0.cv2.block.conv", "neck.Bifusion1.cv1.block.conv"]
    values = dict(zip(group, (2.0, 3.0, 1.5)))  # distinct by hand (calibration gives one value to one tensor)
    calibrated.update({name: torch.tensor(v) for name, v in values.items()})
    layers = quant.quant_layers(model)

    share_input_amax(model, [group], calibrated)
    assert all(float(layers[n].input_quantizer._amax) == max(values.values()) for n in group)
    top = max(values, key=values.get)
    quant.set_quantized(model, [top], False)  # the largest member runs float: the others fall back to their max
    report = share_input_amax(model, [group], calibrated)
    rest = [n for n in group if n != top]
    assert all(float(layers[n].input_quantizer._amax) == max(values[n] for n in rest) for n in rest)
    assert float(layers[top].input_quantizer._amax) == values[top] and report[0]["layers"] == rest
    outside = "backbone.stem.rbr_reparam"
    assert torch.equal(layers[outside].input_quantizer._amax, calibrated[outside])
