"""ONNX graph rewrites for TensorRT: FP16-typed float regions, an EfficientNMS_TRT head and a Q/DQ summary.

The rewrites take a ``onnx.ModelProto`` and return a new one; the caller's model is never changed.
The graphs are those of ``utils.deploy.onnx_export.export_onnx``: input ``images`` float32 [B,3,H,W], output ``outputs``
float32 [B,N,5+nc] (cx, cy, w, h in input pixels, objectness, class scores), optionally with Q/DQ pairs (int8,
per-tensor activation scales, per-channel weight scales on axis 0 for Conv and ConvTranspose).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from utils.errors import InputError

_logger = logging.getLogger(__name__)

OUTPUT_NAME = "outputs"  # utils.deploy.onnx_export.OUTPUT_NAME (not imported: that module pulls in torch)
# QuantizeLinear-19 / DequantizeLinear-19 are the first versions whose scales may be float16 (13 allows float only)
FP16_OPSET = 19
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24: smaller magnitudes round to zero
NMS_DOMAIN, NMS_OP = "TRT", "EfficientNMS_TRT"
NMS_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_INT64_MAX = np.iinfo(np.int64).max


# ------------------------------------------------------------------------------------------------------ helpers
def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) operator set the model imports (0 when it imports none)."""
    return max((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), default=0)


def _elem_type(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type


def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Dimensions of a tensor value (int, symbolic name or '?'), None when the rank is unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]


def _used_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    for node in graph.node:
        names.update(node.input, node.output)
        names.add(node.name)
    return names


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``, ... whichever is not in ``used`` yet (then reserved)."""
    candidate, i = name, 0
    while candidate in used:
        i += 1
        candidate = f"{name}_{i}"
    used.add(candidate)
    return candidate


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The initializers and Constant node values (``value`` attribute) by tensor name."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


# --------------------------------------------------------------------------------------------------- FP16 graph
def _check_retypable(graph: onnx.GraphProto) -> None:
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in _DEFAULT_DOMAINS})
    if custom:
        raise InputError(f"cannot retype custom ops {custom} to FP16; call to_fp16_graph before add_efficient_nms")
    nested = sorted({n.op_type for n in graph.node for a in n.attribute
                     if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)})
    if nested:
        raise InputError(f"cannot retype graphs with subgraphs ({nested}) to FP16; export the model without them")


def _with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of ``model`` importing at least ``version`` of the default opset (ONNX's adapters rewrite the ops
    whose inputs or attributes changed, e.g. Split-18, ReduceMean-18, Resize-18/19)."""
    current = default_opset(model)
    if current >= version:
        return _copy(model)
    try:
        converted = version_converter.convert_version(model, version)
    except (version_converter.ConvertError, RuntimeError) as e:
        raise InputError(f"cannot convert the model from opset {current} to {version}: {_one_line(e)}") from e
    converted.ir_version = max(converted.ir_version, helper.find_min_ir_version_for(
        list(converted.opset_import), ignore_unknown=True))
    _logger.info("default opset raised from %d to %d (FP16 Q/DQ scales need opset %d)", current, version, version)
    return converted


def _qdq_scales(graph: onnx.GraphProto) -> set[str]:
    return {n.input[1] for n in graph.node if n.op_type in _QDQ and len(n.input) > 1}


def _to_half(values: np.ndarray, name: str, is_scale: bool) -> np.ndarray:
    """``values`` as float16: finite magnitudes above 65504 clamp to +-65504 and Q/DQ scales that would round to
    zero become 2**-24 (a zero scale divides by zero), each with a warning."""
    values = np.asarray(values, dtype=np.float32)
    big = np.isfinite(values) & (np.abs(values) > FP16_MAX)
    if big.any():
        _logger.warning("%s: %d value(s) beyond the FP16 range (largest |x| %.6g) clamped to +-%g",
                        name, int(big.sum()), float(np.abs(values[big]).max()), FP16_MAX)
        values = np.where(big, np.sign(values) * FP16_MAX, values)
    half = values.astype(np.float16)
    if is_scale:
        lost = (half == 0) & (values != 0)
        if lost.any():
            _logger.warning("%s: %d Q/DQ scale(s) below the smallest FP16 value (smallest %.3g) raised to %.3g",
                            name, int(lost.sum()), float(np.abs(values[lost]).min()), FP16_TINY)
            half[lost] = np.float16(FP16_TINY)
    return half


def _half_tensor(tensor: onnx.TensorProto, is_scale: bool) -> onnx.TensorProto:
    return numpy_helper.from_array(_to_half(numpy_helper.to_array(tensor), tensor.name, is_scale), tensor.name)


def _retype_initializers(graph: onnx.GraphProto, scales: set[str]) -> None:
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_half_tensor(tensor, tensor.name in scales))


def _retype_constant(node: onnx.NodeProto, scales: set[str]) -> None:
    """Constant: a float ``value`` tensor, or ``value_float(s)``, becomes a float16 ``value`` tensor."""
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return
    is_scale = node.output[0] in scales
    if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
        attr.t.CopyFrom(_half_tensor(attr.t, is_scale))
    elif attr.name in ("value_float", "value_floats"):
        values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float32)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(
            _to_half(values, node.output[0], is_scale), node.output[0])))


def _retype_constant_of_shape(node: onnx.NodeProto) -> None:
    """ConstantOfShape: a float ``value``, or the default (float32 zero), becomes float16."""
    value = next((a for a in node.attribute if a.name == "value"), None)
    if value is None:
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
    elif value.t.data_type == TensorProto.FLOAT:
        value.t.CopyFrom(_half_tensor(value.t, is_scale=False))


def _retype_nodes(graph: onnx.GraphProto, scales: set[str]) -> None:
    for node in graph.node:
        if node.op_type == "Constant":
            _retype_constant(node, scales)
        elif node.op_type == "ConstantOfShape":
            _retype_constant_of_shape(node)
        elif node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16


def _cast_boundary(graph: onnx.GraphProto) -> None:
    """Cast float32 graph inputs to float16 on entry and float16 results back to float32 on exit, so the graph's
    interface (names, types, shapes) stays what it was."""
    used = _used_names(graph)
    initializers = {t.name for t in graph.initializer}
    casts_in = []
    for value in graph.input:
        if _elem_type(value) == TensorProto.FLOAT and value.name not in initializers:
            half = _unique(f"{value.name}_fp16", used)
            _rename_uses(graph, value.name, half)
            casts_in.append(helper.make_node("Cast", [value.name], [half], _unique(f"{value.name}_to_fp16", used),
                                             to=TensorProto.FLOAT16))
    for value in graph.output:
        if _elem_type(value) == TensorProto.FLOAT:
            half = _unique(f"{value.name}_fp16", used)
            _rename_uses(graph, value.name, half)
            for node in graph.node:
                node.output[:] = [half if o == value.name else o for o in node.output]
            graph.node.append(helper.make_node("Cast", [half], [value.name], _unique(f"{value.name}_to_fp32", used),
                                               to=TensorProto.FLOAT))
    for i, cast in enumerate(casts_in):
        graph.node.insert(i, cast)


def _infer_and_check(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """``model`` with inferred value_info, after the strict type/shape inference and the full checker pass."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(inferred, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InputError(f"the {what} is not valid ONNX: {_one_line(e)}") from e
    return inferred


def _check_no_float32(model: onnx.ModelProto) -> None:
    graph = model.graph
    boundary = {v.name for v in (*graph.input, *graph.output)}
    left = [v.name for v in graph.value_info if _elem_type(v) == TensorProto.FLOAT and v.name not in boundary]
    if left:
        producers = {o: n.op_type for n in graph.node for o in n.output}
        ops = sorted({producers.get(name, "?") for name in left})
        raise InputError(f"{len(left)} tensor(s) stay float32 after the FP16 rewrite (e.g. {left[0]!r}, made by "
                         f"{ops}): the graph holds ops whose output type this rewrite cannot change")


def to_fp16_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its float region typed FP16, for TensorRT strongly typed builds.

    Every float32 tensor inside the graph becomes float16: initializers (weights, biases, Q/DQ scales), Constant
    and ConstantOfShape values, and Cast-to-float targets. The float32 graph inputs and outputs keep their names
    and types through Cast nodes at the boundary, so callers feed and read the same data. Int8 zero points and
    int64 shape tensors are untouched. The default opset is raised to at least 19, the first whose
    QuantizeLinear/DequantizeLinear accept float16 scales. Values beyond the FP16 range clamp to +-65504 (and Q/DQ
    scales that would round to zero to 2**-24), with a warning.

    Returns:
        A new model with inferred value_info, checked by ``onnx.checker`` (full check).

    Raises:
        InputError: the graph holds custom-domain ops (apply ``add_efficient_nms`` afterwards) or subgraphs, its
            opset cannot be converted, or a float32 tensor remains (an op this rewrite cannot retype).
    """
    _check_retypable(model.graph)
    out = _with_opset(model, FP16_OPSET)
    graph = out.graph
    del graph.value_info[:]  # stale float32 types; inferred again below
    scales = _qdq_scales(graph)
    _retype_initializers(graph, scales)
    _retype_nodes(graph, scales)
    _cast_boundary(graph)
    out = _infer_and_check(out, "FP16 graph")
    _check_no_float32(out)
    return out


# ---------------------------------------------------------------------------------------------- EfficientNMS
def _check_nms_args(max_det: int, iou_threshold: float, score_threshold: float) -> None:
    if isinstance(max_det, bool) or not isinstance(max_det, int) or max_det < 1:
        raise InputError(f"max_det must be a positive integer, got {max_det!r}")
    for name, value in (("iou_threshold", iou_threshold), ("score_threshold", score_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be a number in [0, 1] (scores are objectness x class probability), "
                             f"got {value!r}")


def _detections(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The ``outputs`` graph output, checked to be float [batch, anchors, 5 + classes]."""
    value = next((v for v in graph.output if v.name == OUTPUT_NAME), None)
    if value is None:
        raise InputError(f"the model has no output {OUTPUT_NAME!r} (it has {[v.name for v in graph.output]}); "
                         "add_efficient_nms needs the raw detections of export_onnx")
    dims = _dims(value)
    if dims is None or len(dims) != 3 or (isinstance(dims[2], int) and 0 < dims[2] < 6):
        raise InputError(f"model output {OUTPUT_NAME!r} has shape {dims}; add_efficient_nms needs [batch, anchors, "
                         "5 + classes] (cx, cy, w, h, objectness, class scores) as export_onnx writes it")
    if _elem_type(value) not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise InputError(f"model output {OUTPUT_NAME!r} has element type "
                         f"{TensorProto.DataType.Name(_elem_type(value))}; add_efficient_nms needs float32 or float16")
    return value


def _add_slice(graph: onnx.GraphProto, used: set[str], source: str, start: int, end: int, name: str) -> str:
    """Append ``source[..., start:end]`` (int64 initializers for starts/ends/axes); returns the result's name."""
    inputs = [source]
    for part, value in (("starts", start), ("ends", end), ("axes", -1)):
        tensor = numpy_helper.from_array(np.array([value], np.int64), _unique(f"{name}/{part}", used))
        graph.initializer.append(tensor)
        inputs.append(tensor.name)
    result = _unique(name, used)
    graph.node.append(helper.make_node("Slice", inputs, [result], _unique(f"{name}/Slice", used)))
    return result


def _nms_attributes(max_det: int, iou_threshold: float, score_threshold: float,
                    class_agnostic: bool) -> dict[str, Any]:
    # names and types of TensorRT's EfficientNMS_TRT plugin (version 1); box_coding 1 = [x, y, w, h] centre-size;
    # score_activation 0: the scores are probabilities already; class_agnostic needs TensorRT >= 8.6 (older
    # versions ignore it and suppress per class)
    return {"background_class": -1, "box_coding": 1, "iou_threshold": float(iou_threshold),
            "max_output_boxes": int(max_det), "plugin_version": "1", "score_activation": 0,
            "score_threshold": float(score_threshold), "class_agnostic": int(bool(class_agnostic))}


def _nms_outputs(batch: onnx.TensorShapeProto.Dimension, float_type: int, max_det: int) -> list[onnx.ValueInfoProto]:
    b = batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or None)
    shapes = ([b, 1], [b, max_det, 4], [b, max_det], [b, max_det])
    types = (TensorProto.INT32, float_type, float_type, TensorProto.INT32)
    return [helper.make_tensor_value_info(n, t, s) for n, t, s in zip(NMS_OUTPUTS, types, shapes)]


def add_efficient_nms(model: onnx.ModelProto, max_det: int = 100, iou_threshold: float = 0.45,
                      score_threshold: float = 0.25, class_agnostic: bool = False) -> onnx.ModelProto:
    """The model with TensorRT's ``EfficientNMS_TRT`` plugin in place of its ``outputs`` [B,N,5+nc] output.

    The plugin gets boxes ``outputs[..., :4]`` (cx, cy, w, h: ``box_coding`` 1) and scores
    ``outputs[..., 5:] * outputs[..., 4:5]``; its outputs, in the plugin's order, become the graph outputs
    ``num_dets`` int32 [B,1], ``det_boxes`` [B,max_det,4], ``det_scores`` [B,max_det] (float32, or float16 when
    ``outputs`` is) and ``det_classes`` int32 [B,max_det]. The plugin writes ``det_boxes`` as corners
    (x1, y1, x2, y2) whatever the input coding. The node is in domain ``TRT``: TensorRT's ONNX parser looks plugins
    up by op type, ``plugin_version`` and ``plugin_namespace``, not by domain. ONNX Runtime cannot run the result.

    Args:
        max_det: detections kept per image (``max_output_boxes``).
        iou_threshold: boxes overlapping a kept box of the same class (any class if ``class_agnostic``) by more
            than this are suppressed.
        score_threshold: scores below this are dropped before NMS.
        class_agnostic: suppress across classes (TensorRT >= 8.6; older versions ignore it).

    Raises:
        InputError: bad arguments, or the model has no float ``outputs`` output of rank 3 (e.g. NMS added already).
    """
    _check_nms_args(max_det, iou_threshold, score_threshold)
    if default_opset(model) < 10:
        raise InputError(f"opset {default_opset(model)} is too old for Slice with inputs; export with opset >= 13")
    out = _copy(model)
    graph = out.graph
    raw = _detections(graph)
    used = _used_names(graph)
    boxes = _add_slice(graph, used, raw.name, 0, 4, "nms/boxes")
    objectness = _add_slice(graph, used, raw.name, 4, 5, "nms/objectness")
    classes = _add_slice(graph, used, raw.name, 5, _INT64_MAX, "nms/class_scores")
    scores = _unique("nms/scores", used)
    graph.node.append(helper.make_node("Mul", [classes, objectness], [scores], _unique("nms/Mul", used)))
    outputs = _nms_outputs(raw.type.tensor_type.shape.dim[0], _elem_type(raw), max_det)
    graph.node.append(helper.make_node(NMS_OP, [boxes, scores], list(NMS_OUTPUTS), _unique("EfficientNMS", used),
                                       domain=NMS_DOMAIN, **_nms_attributes(max_det, iou_threshold,
                                                                           score_threshold, class_agnostic)))
    graph.value_info.append(raw)  # the raw detections stay, now as an inner tensor (append copies)
    graph.output.remove(raw)
    graph.output.extend(outputs)
    if not any(o.domain == NMS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(NMS_DOMAIN, 1))
    try:
        onnx.checker.check_model(out)  # no full check: ONNX knows no schema for the plugin
    except onnx.checker.ValidationError as e:
        raise InputError(f"the graph with EfficientNMS_TRT is not valid ONNX: {_one_line(e)}") from e
    return out


# ---------------------------------------------------------------------------------------------------- summary
def _weight_dq_axis(dq: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> int | None:
    """The channel axis of a weight DequantizeLinear, None when its scale is per-tensor."""
    scale = constants.get(dq.input[1])
    if scale is not None and len(scale.dims) <= 1 and math.prod(scale.dims) == 1:
        return None
    return next((a.i for a in dq.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1


def _conv_counts(nodes: Iterable[onnx.NodeProto], producers: dict[str, onnx.NodeProto],
                 constants: dict[str, onnx.TensorProto]) -> tuple[int, int, list[int]]:
    quantized, floating, axes = 0, 0, set()
    for node in nodes:
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            floating += 1
            continue
        quantized += 1
        axis = _weight_dq_axis(dq, constants)
        if axis is not None:
            axes.add(axis)
    return quantized, floating, sorted(axes)


def input_scale_muls(graph: onnx.GraphProto) -> dict[str, str]:
    """Equalization multiplies (``utils.quant.equalize``): ``Mul`` nodes by a per-channel constant ([1, C, 1, 1],
    C > 1) whose output feeds a QuantizeLinear, by the name of the Conv that the Q/DQ pair then feeds."""
    producers = {o: n for n in graph.node for o in n.output}
    constants = _constants(graph)
    found = {}
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        dq = producers.get(conv.input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        mul = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if mul is None or mul.op_type != "Mul":
            continue
        scale = next((constants[i] for i in mul.input if i in constants), None)
        if scale is not None and len(scale.dims) == 4 and scale.dims[1] > 1 and math.prod(scale.dims) == scale.dims[1]:
            found[conv.name] = mul.name
    return found


def qdq_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Counts of the model's Q/DQ structure, as a flat dict.

    Keys: ``quantize_linear`` and ``dequantize_linear`` (nodes); ``quantized_conv`` / ``float_conv`` and
    ``quantized_conv_transpose`` / ``float_conv_transpose`` (a layer is quantized when its weight input comes
    from a DequantizeLinear); ``conv_weight_axes`` and ``conv_transpose_weight_axes`` (sorted channel axes of the
    per-channel weight scales; per-tensor weight scales add none); ``input_scale_mul`` (equalization multiplies
    right before a Conv's input QuantizeLinear, ``input_scale_muls``).
    """
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    producers = {o: n for n in graph.node for o in n.output}
    constants = _constants(graph)
    summary: dict[str, Any] = {"quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"]}
    for op_type, key in (("Conv", "conv"), ("ConvTranspose", "conv_transpose")):
        nodes = [n for n in graph.node if n.op_type == op_type]
        quantized, floating, axes = _conv_counts(nodes, producers, constants)
        summary.update({f"quantized_{key}": quantized, f"float_{key}": floating, f"{key}_weight_axes": axes})
    summary["input_scale_mul"] = len(input_scale_muls(graph))
    return summary
