"""Tests for utils/deploy/onnx_graph.py: FP16-typed graphs keep their float32 interface and match the FP32 model on ONNX
Runtime, the EfficientNMS_TRT head is wired as TensorRT's plugin expects, and the Q/DQ summary counts what the
quantized export holds. CPU only; a 64-pixel YOLOv6-n with 2 classes."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models import build_model, load_config, reparameterize
from models.config import with_overrides
from utils.deploy import onnx_graph as og
from utils.deploy.onnx_export import OUTPUT_NAME, export_onnx
from utils.errors import InputError
from utils.quant import calibration
from utils.quant import quantizers as quant

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
# one of the two ConvTranspose upsamplers of the neck, left in float by the partial-quantization summary test
PARTIAL_FLOAT_LAYER = "neck.Bifusion0.upsample.upsample_transpose"


# ----------------------------------------------------------------------------------------------------- fixtures
def _deployed() -> torch.nn.Module:
    """A deployed 2-class YOLOv6-n whose prediction convs give varied boxes and scores (YOLOv6 zero-inits them)."""
    torch.manual_seed(0)
    model = reparameterize(build_model(with_overrides(load_config("yolov6n"), num_classes=2)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in list(model.detect.cls_preds) + list(model.detect.reg_preds):
            conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=g))
        for conv in model.detect.cls_preds:
            conv.bias.zero_()  # class scores around 0.5 rather than YOLOv6's prior of 0.01
    return model.eval()


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


def _export_qdq(model: torch.nn.Module, path: Path, float_layers: tuple[str, ...] = ()) -> onnx.ModelProto:
    qmodel = quant.quantize_model(model)
    calibration.calibrate(qmodel, [torch.from_numpy(_images(2, seed=1))], num_batches=1)
    if float_layers:
        quant.set_quantized(qmodel, float_layers, enabled=False)
    with quant.fb_fake_quant():
        export_onnx(qmodel, path, SIZE, dynamic_batch=True)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """FP32 and Q/DQ exports (dynamic batch) of the same model."""
    tmp = tmp_path_factory.mktemp("onnx_graph")
    model = _deployed()
    export_onnx(model, tmp / "fp32.onnx", SIZE, dynamic_batch=True)
    return {"fp32": onnx.load(str(tmp / "fp32.onnx")), "qdq": _export_qdq(model, tmp / "qdq.onnx")}


@pytest.fixture(scope="module")
def fp16(models) -> dict[str, onnx.ModelProto]:
    return {name: og.to_fp16_graph(model) for name, model in models.items()}


def _run(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # ORT warns that it cannot constant-fold FP16 nodes it runs through casts
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def _float_constants(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the float initializers and Constant values, by name."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({n.output[0]: a.t.data_type for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})
    return {k: v for k, v in types.items() if v in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}


def _tensors_of_type(model: onnx.ModelProto, elem_type: int) -> dict[str, np.ndarray]:
    tensors = [t for t in model.graph.initializer if t.data_type == elem_type]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value" and a.t.data_type == elem_type]
    return {t.name: numpy_helper.to_array(t) for t in tensors}


# ------------------------------------------------------------------------------------------------- FP16 graph
def test_output_name_is_the_exporters():
    assert og.OUTPUT_NAME == OUTPUT_NAME


@pytest.mark.parametrize("name", ["fp32", "qdq"])
def test_fp16_graph_types_every_inner_float_tensor_fp16(name, models, fp16):
    half = fp16[name]
    onnx.checker.check_model(half, full_check=True)
    assert og.default_opset(half) >= 19
    assert [(v.name, v.type.tensor_type.elem_type) for v in half.graph.input] == [("images", TensorProto.FLOAT)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in half.graph.output] == [("outputs", TensorProto.FLOAT)]
    inferred = onnx.shape_inference.infer_shapes(half, strict_mode=True)
    boundary = {"images", "outputs"}
    inner = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name not in boundary}
    assert inner and TensorProto.FLOAT not in inner.values()
    assert TensorProto.FLOAT16 in inner.values()
    assert set(_float_constants(half).values()) == {TensorProto.FLOAT16}
    # the only float32 tensors are the interface: one Cast in, one Cast out
    casts = [n for n in half.graph.node if n.op_type == "Cast"]
    assert ("images", TensorProto.FLOAT16) in [(n.input[0], n.attribute[0].i) for n in casts]
    assert ("outputs", TensorProto.FLOAT) in [(n.output[0], n.attribute[0].i) for n in casts]


@pytest.mark.parametrize("name", ["fp32", "qdq"])
def test_fp16_graph_keeps_int_tensors_and_qdq_structure(name, models, fp16):
    for elem_type in (TensorProto.INT8, TensorProto.INT64):
        before, after = _tensors_of_type(models[name], elem_type), _tensors_of_type(fp16[name], elem_type)
        assert before.keys() <= after.keys()
        for key, value in before.items():
            np.testing.assert_array_equal(after[key], value)
    assert og.qdq_summary(fp16[name]) == og.qdq_summary(models[name])


@pytest.mark.parametrize("name", ["fp32", "qdq"])
def test_fp16_graph_matches_fp32_on_onnx_runtime(name, models, fp16):
    """ORT's CPU provider has FP16 QuantizeLinear/DequantizeLinear-19 kernels but float32-only Conv, Relu, Mul...:
    it runs those through inserted casts, so this checks the graph and FP16 storage, not FP16 arithmetic."""
    images = _images(3, seed=2)
    (expected,), (actual,) = _run(models[name], images), _run(fp16[name], images)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    for part in (np.s_[..., :4], np.s_[..., 4:]):  # boxes in pixels, then objectness and class scores
        span = float(expected[part].max() - expected[part].min())
        assert span > 0
        np.testing.assert_allclose(actual[part], expected[part], rtol=0, atol=1e-2 * span)


def test_fp16_graph_leaves_the_callers_model_alone(models):
    before, opset = models["qdq"].SerializeToString(), og.default_opset(models["qdq"])
    og.to_fp16_graph(models["qdq"])
    assert models["qdq"].SerializeToString() == before
    assert og.default_opset(models["qdq"]) == opset < 19


def _retype_cases_model() -> onnx.ModelProto:
    """images -> Mul(w) + Constant(value_float) + ConstantOfShape(default) + Cast(Gather(Shape)) -> Q/DQ -> outputs."""
    nodes = [
        helper.make_node("Mul", ["images", "w"], ["m"]),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Constant", [], ["thirds"], value_floats=[1 / 3, 2 / 3]),
        helper.make_node("Add", ["m", "half"], ["a"]),
        helper.make_node("Add", ["a", "thirds"], ["a2"]),
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("Add", ["a2", "zeros"], ["b"]),
        helper.make_node("Gather", ["shape", "last"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["width_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["b", "width_f"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["outputs"]),
    ]
    inits = [numpy_helper.from_array(np.array([[[[1.5]], [[-2.0]], [[3.0]]]], np.float32), "w"),
             numpy_helper.from_array(np.array(3, np.int64), "last"),
             numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero")]
    graph = helper.make_graph(nodes, "retype", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                              ["batch", 3, 4, 2])],
                              [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [None] * 4)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_fp16_graph_retypes_constants_casts_and_constant_of_shape():
    model = _retype_cases_model()
    onnx.checker.check_model(model, full_check=True)
    half = og.to_fp16_graph(model)
    nodes = {n.output[0]: n for n in half.graph.node}
    assert nodes["half"].attribute[0].name == "value"
    assert nodes["half"].attribute[0].t.data_type == TensorProto.FLOAT16
    assert numpy_helper.to_array(nodes["thirds"].attribute[0].t).dtype == np.float16
    assert numpy_helper.to_array(nodes["zeros"].attribute[0].t).dtype == np.float16
    assert nodes["width_f"].attribute[0].i == TensorProto.FLOAT16
    images = np.linspace(-1, 1, 2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    (expected,), (actual,) = _run(model, images), _run(half, images)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=0.0200001)  # at most one quantization step


def test_fp16_graph_clamps_overflow_and_vanishing_scales(caplog):
    model = _retype_cases_model()
    inits = {t.name: t for t in model.graph.initializer}
    inits["w"].CopyFrom(numpy_helper.from_array(np.array([[[[1e5]], [[-7e4]], [[np.inf]]]], np.float32), "w"))
    inits["scale"].CopyFrom(numpy_helper.from_array(np.array(1e-9, np.float32), "scale"))
    with caplog.at_level(logging.WARNING, logger="utils.deploy.onnx_graph"):
        half = og.to_fp16_graph(model)
    values = {t.name: numpy_helper.to_array(t) for t in half.graph.initializer}
    np.testing.assert_array_equal(values["w"].ravel(), np.array([65504, -65504, np.inf], np.float16))
    assert values["scale"] == np.float16(2.0 ** -24)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("w: 2 value(s) beyond the FP16 range") for m in messages)
    assert any(m.startswith("scale: 1 Q/DQ scale(s) below the smallest FP16 value") for m in messages)


def test_fp16_graph_refuses_custom_ops(models):
    with pytest.raises(InputError, match="call to_fp16_graph before add_efficient_nms"):
        og.to_fp16_graph(og.add_efficient_nms(models["fp32"]))


# ------------------------------------------------------------------------------------------------ EfficientNMS
def _attributes(node: onnx.NodeProto) -> dict[str, tuple[int, object]]:
    return {a.name: (a.type, helper.get_attribute_value(a)) for a in node.attribute}


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _value_infos(values) -> list[tuple[str, int, list]]:
    return [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in values]


def test_efficient_nms_node_attributes_and_outputs(models):
    model = og.add_efficient_nms(models["qdq"])
    onnx.checker.check_model(model)  # full_check would need a schema for the plugin
    (nms,) = [n for n in model.graph.node if n.op_type == "EfficientNMS_TRT"]
    assert nms.domain == "TRT" and ("TRT", 1) in [(o.domain, o.version) for o in model.opset_import]
    i, f, s = onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING
    attrs = _attributes(nms)
    assert {k: v for k, v in attrs.items() if k not in ("iou_threshold", "score_threshold")} == {
        "background_class": (i, -1), "box_coding": (i, 1), "max_output_boxes": (i, 100),
        "plugin_version": (s, b"1"), "score_activation": (i, 0), "class_agnostic": (i, 0)}
    assert attrs["iou_threshold"][0] == f and attrs["iou_threshold"][1] == pytest.approx(0.45)
    assert attrs["score_threshold"][0] == f and attrs["score_threshold"][1] == pytest.approx(0.25)
    assert list(nms.output) == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert _value_infos(model.graph.output) == [
        ("num_dets", TensorProto.INT32, ["batch", 1]), ("det_boxes", TensorProto.FLOAT, ["batch", 100, 4]),
        ("det_scores", TensorProto.FLOAT, ["batch", 100]), ("det_classes", TensorProto.INT32, ["batch", 100])]


def test_efficient_nms_options_reach_the_plugin(models):
    model = og.add_efficient_nms(models["fp32"], max_det=7, iou_threshold=0.6, score_threshold=0.05,
                                 class_agnostic=True)
    (nms,) = [n for n in model.graph.node if n.op_type == "EfficientNMS_TRT"]
    attrs = {k: v for k, (_, v) in _attributes(nms).items()}
    assert attrs["max_output_boxes"] == 7 and attrs["class_agnostic"] == 1
    assert attrs["iou_threshold"] == pytest.approx(0.6) and attrs["score_threshold"] == pytest.approx(0.05)
    assert [_dims(v) for v in model.graph.output] == [["batch", 1], ["batch", 7, 4], ["batch", 7], ["batch", 7]]


def _plugin_inputs_as_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy without the plugin whose outputs are the plugin's inputs, for ONNX Runtime to compute."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    (nms,) = [n for n in out.graph.node if n.op_type == "EfficientNMS_TRT"]
    names = list(nms.input)
    out.graph.node.remove(nms)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * 3) for n in names)
    return out, names


@pytest.mark.parametrize("name", ["fp32", "qdq"])
def test_efficient_nms_inputs_are_boxes_and_objectness_times_class(name, models):
    images = _images(2, seed=3)
    (raw,) = _run(models[name], images)
    exposed, names = _plugin_inputs_as_outputs(og.add_efficient_nms(models[name]))
    onnx.checker.check_model(exposed, full_check=True)
    boxes, scores = _run(exposed, images)
    assert boxes.shape == raw.shape[:2] + (4,) and scores.shape == raw.shape[:2] + (raw.shape[2] - 5,)
    np.testing.assert_array_equal(boxes, raw[..., :4])
    np.testing.assert_allclose(scores, raw[..., 5:] * raw[..., 4:5], rtol=1e-7, atol=0)


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_efficient_nms_on_a_static_batch_keeps_batch_and_float_type(elem_type):
    """images [1,3,4,4] -> Cast -> Reshape -> outputs [1,8,6] (one class): a fixed batch and float16 detections."""
    nodes = [helper.make_node("Cast", ["images"], ["cast"], to=elem_type),
             helper.make_node("Reshape", ["cast", "shape"], ["outputs"])]
    images_info = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])
    outputs_info = helper.make_tensor_value_info("outputs", elem_type, [1, 8, 6])
    graph = helper.make_graph(nodes, "static", [images_info], [outputs_info],
                              [numpy_helper.from_array(np.array([1, 8, 6], np.int64), "shape")])
    model = og.add_efficient_nms(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), max_det=5)
    assert _value_infos(model.graph.output) == [
        ("num_dets", TensorProto.INT32, [1, 1]), ("det_boxes", elem_type, [1, 5, 4]),
        ("det_scores", elem_type, [1, 5]), ("det_classes", TensorProto.INT32, [1, 5])]
    exposed, _ = _plugin_inputs_as_outputs(model)
    for value in exposed.graph.output:
        value.type.tensor_type.elem_type = elem_type
    images = _images(1, seed=4)[:, :, :4, :4].copy()
    raw = images.reshape(1, 8, 6).astype(helper.tensor_dtype_to_np_dtype(elem_type))
    boxes, scores = _run(exposed, images)
    np.testing.assert_array_equal(boxes, raw[..., :4])
    np.testing.assert_array_equal(scores, raw[..., 5:] * raw[..., 4:5])


def test_efficient_nms_after_fp16_graph(fp16):
    model = og.add_efficient_nms(fp16["qdq"])
    onnx.checker.check_model(model)
    assert [t for _, t, _ in _value_infos(model.graph.output)] == [
        TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT32]


def test_efficient_nms_leaves_the_callers_model_alone(models):
    before = models["fp32"].SerializeToString()
    og.add_efficient_nms(models["fp32"])
    assert models["fp32"].SerializeToString() == before


def _flat_output_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Flatten", ["images"], ["outputs"])], "flat",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [1, 48])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_efficient_nms_refuses_models_without_raw_detections(models):
    with pytest.raises(InputError, match="no output 'outputs'"):
        og.add_efficient_nms(og.add_efficient_nms(models["fp32"]))
    with pytest.raises(InputError, match=r"has shape \[1, 48\]"):
        og.add_efficient_nms(_flat_output_model())


@pytest.mark.parametrize("kwargs, match", [
    ({"max_det": 0}, "max_det"), ({"max_det": True}, "max_det"), ({"max_det": 2.5}, "max_det"),
    ({"iou_threshold": 1.5}, "iou_threshold"), ({"iou_threshold": None}, "iou_threshold"),
    ({"score_threshold": -0.1}, "score_threshold"), ({"score_threshold": float("nan")}, "score_threshold")])
def test_efficient_nms_refuses_bad_arguments(kwargs, match, models):
    with pytest.raises(InputError, match=match):
        og.add_efficient_nms(models["fp32"], **kwargs)


# ----------------------------------------------------------------------------------------------------- summary
def test_qdq_summary_of_a_quantized_export(models):
    ops = [n.op_type for n in models["qdq"].graph.node]
    summary = og.qdq_summary(models["qdq"])
    assert summary == {
        "quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
        "quantized_conv": ops.count("Conv"), "float_conv": 0, "conv_weight_axes": [0],
        "quantized_conv_transpose": 2, "float_conv_transpose": 0, "conv_transpose_weight_axes": [0],
        "input_scale_mul": 0}
    assert summary["quantize_linear"] == summary["dequantize_linear"] > 0


def test_qdq_summary_of_a_float_export(models):
    ops = [n.op_type for n in models["fp32"].graph.node]
    assert og.qdq_summary(models["fp32"]) == {
        "quantize_linear": 0, "dequantize_linear": 0, "quantized_conv": 0, "float_conv": ops.count("Conv"),
        "conv_weight_axes": [], "quantized_conv_transpose": 0, "float_conv_transpose": 2,
        "conv_transpose_weight_axes": [], "input_scale_mul": 0}


def test_qdq_summary_counts_a_float_fallback_layer(tmp_path):
    summary = og.qdq_summary(_export_qdq(_deployed(), tmp_path / "partial.onnx", (PARTIAL_FLOAT_LAYER,)))
    assert summary["quantized_conv_transpose"] == 1 and summary["float_conv_transpose"] == 1
    assert summary["float_conv"] == 0 and summary["conv_transpose_weight_axes"] == [0]


def test_qdq_summary_per_tensor_weight_scale_adds_no_axis():
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("Conv", ["images", "wd"], ["outputs"])]
    inits = [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    graph = helper.make_graph(nodes, "per_tensor", [helper.make_tensor_value_info("images", 1, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("outputs", 1, [1, 2, 4, 4])], inits)
    summary = og.qdq_summary(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert summary["quantized_conv"] == 1 and summary["conv_weight_axes"] == []
