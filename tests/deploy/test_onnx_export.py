"""Tests for utils/deploy/onnx_export.py: a Q/DQ ONNX export of a calibrated model matches PyTorch's fake
quantization on ONNX Runtime."""
from __future__ import annotations

import warnings

import onnx
import onnxruntime as ort
import pytest
import torch

from tests.helpers import images
from utils.quant import quantizers as quant
from utils.quant.compat import TensorQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # the same function: almost every output equal; where an activation sits on a rounding tie (ONNX x / scale vs
    # PyTorch x * (1 / scale), and the CPU's own summation order) one INT8 level flips and moves a few outputs by a
    # few thousandths of a pixel (which ties occur depends on the processor's kernels)
    with torch.no_grad():
        for reference in (expected, calibrated(x)):  # PyTorch's native fake quant and 2.1.3's own agree
            diff = (actual - reference).abs()
            assert diff.median().item() <= 1e-5 and diff.max().item() <= 1e-2


def test_the_export_carries_the_class_names_for_evaluation(tmp_path):
    from models import reparameterize
    from tests.helpers import tiny_detector
    from utils.deploy.onnx_export import export_verified
    from utils.inference.runners import OnnxRuntimeRunner

    model = reparameterize(tiny_detector())
    model.config = {**model.config, "names": ["cat", "dog", "car", "bus", "cup", "box"]}
    path = tmp_path / "named.onnx"
    export_verified(model, path, images(1, seed=3), img_size=64)
    assert OnnxRuntimeRunner(path).class_names == ["cat", "dog", "car", "bus", "cup", "box"]
    model.config = {k: v for k, v in model.config.items() if k != "names"}
    export_verified(model, tmp_path / "unnamed.onnx", images(1, seed=3), img_size=64)
    assert OnnxRuntimeRunner(tmp_path / "unnamed.onnx").class_names is None


def test_the_basic_level_runs_qdq_like_pytorch(calibrated, tmp_path):
    """The export's check and the Q/DQ evaluations run ONNX Runtime at its basic level (see ORT_LEVELS): it agrees
    with PyTorch's fake quantization; an unknown level is refused."""
    from utils.deploy.onnx_export import export_verified
    from utils.errors import InputError
    from utils.inference.runners import OnnxRuntimeRunner

    path = tmp_path / "qdq.onnx"
    export_verified(calibrated, path, images(1, seed=4), img_size=64)
    runner = OnnxRuntimeRunner(path, optimization="basic")
    assert runner.session.get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    x = images(2, seed=8)
    with torch.no_grad(), quant.fb_fake_quant():
        expected = calibrated(x)
    assert (runner(x) - expected).abs().max().item() <= 1e-2  # px on 64 px inputs: rounding of single levels
    with pytest.raises(InputError, match="optimisation level"):
        OnnxRuntimeRunner(path, optimization="extended")
