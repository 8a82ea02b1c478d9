"""Engine layer information: precisions, fused ONNX nodes, comparison with the export's intent, engine_report.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script
from utils.cli import run_cli
from utils.deploy.engine_info import (
    EngineLayer,
    compare_with_intended,
    format_report,
    onnx_nodes_from_name,
    parse_layer_info,
    precision_from_type,
    read_export_info,
    read_layer_info,
    summarize,
)
from utils.errors import InputError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "engine_report.py"


def _load_script():
    return load_script("tools/engine_report.py")


engine_report = _load_script()


def _tensor(name: str, fmt: str, dims: list[int] | None = None) -> dict:
    return {"Name": name, "Location": "Device", "Dimensions": dims or [1, 16, 80, 80], "Format/Datatype": fmt}


def _conv(name: str, weights: str, fmt: str, metadata: str = "") -> dict:
    return {"Name": name, "LayerType": "CaskConvolution", "Inputs": [_tensor("in", fmt)],
            "Outputs": [_tensor(name, fmt)], "ParameterType": "Convolution", "Kernel": [3, 3], "Groups": 1,
            "Weights": {"Type": weights, "Count": 2304}, "Bias": {"Type": "Float", "Count": 16},
            "Metadata": metadata}


INT8_FMT = "Thirty-two wide channel vectorized row major Int8 format"
FP16_FMT = "Channel major FP16 format where channel % 8 == 0"
FP32_FMT = "Row major linear FP32"
STEM = "/backbone/stem/rbr_reparam/Conv + /backbone/stem/act/Relu"

# Written after the documented --exportLayerInfo/--profilingVerbosity=detailed form: a reformat feeding an INT8 fused
# conv, an FP16 conv with a point-wise fusion, a standalone QuantizeLinear, a horizontally fused INT8 conv, an FP32
# conv, two pooling layers of a module called twice, and a Myelin region.
LAYER_INFO = {
    "Layers": [
        {"Name": f"Reformatting CopyNode for Input Tensor 0 to {STEM}", "LayerType": "Reformat",
         "Inputs": [_tensor("images", FP32_FMT)], "Outputs": [_tensor("r", "Row major Int8 format")],
         "ParameterType": "Reformat", "Origin": "REFORMAT"},
        _conv(f"/backbone/stem/rbr_reparam/_weight_quantizer/QuantizeLinear + {STEM}", "Int8", INT8_FMT,
              "[ONNX Layer: /backbone/stem/rbr_reparam/Conv]\x1e[ONNX Layer: /backbone/stem/act/Relu]"),
        _conv("/backbone/ERBlock_2/ERBlock_2.0/rbr_reparam/Conv + PWN(/backbone/ERBlock_2/ERBlock_2.0/act/Relu)",
              "Half", FP16_FMT),
        {"Name": "/neck/reduce_layer0/conv/_input_quantizer/QuantizeLinear", "LayerType": "Scale",
         "Inputs": [_tensor("x", FP32_FMT)], "Outputs": [_tensor("q", INT8_FMT)], "ParameterType": "Scale"},
        _conv("/neck/reduce_layer0/conv/Conv + /neck/reduce_layer0/act/Relu || /neck/Rep_p4/conv1/Conv", "Int8",
              INT8_FMT),
        _conv("/detect/reg_preds.0/Conv", "Float", FP32_FMT),
        {"Name": "/backbone/pool/MaxPool", "LayerType": "CaskPooling", "Inputs": [_tensor("a", INT8_FMT)],
         "Outputs": [_tensor("b", INT8_FMT)], "ParameterType": "Pooling"},
        {"Name": "/backbone/pool/MaxPool_1", "LayerType": "CaskPooling", "Inputs": [_tensor("c", FP16_FMT)],
         "Outputs": [_tensor("d", FP16_FMT)], "ParameterType": "Pooling"},
        {"Name": "{ForeignNode[/detect/Reshape.../detect/Concat_3]}", "LayerType": "Myelin",
         "Inputs": [_tensor("e", "Row major linear FP16 format")], "Outputs": [_tensor("outputs", FP32_FMT)]},
    ],
    "Bindings": ["images", "outputs"],
}

INTENDED = {
    "onnx": "model.onnx",
    "layers": [
        {"name": "backbone.stem.rbr_reparam", "onnx_node": "/backbone/stem/rbr_reparam/Conv", "op": "Conv",
         "precision": "int8"},
        {"name": "backbone.ERBlock_2.0.rbr_reparam", "onnx_node": "/backbone/ERBlock_2/ERBlock_2.0/rbr_reparam/Conv",
         "op": "Conv", "precision": "int8"},
        {"name": "neck.reduce_layer0.conv", "onnx_node": "/neck/reduce_layer0/conv/Conv", "op": "Conv",
         "precision": "float"},
        {"name": "detect.reg_preds.0", "onnx_node": "/detect/reg_preds.0/Conv", "op": "Conv", "precision": "float"},
        {"name": "detect.cls_preds.0", "onnx_node": "/detect/cls_preds.0/Conv", "op": "Conv", "precision": "int8"},
        {"name": "neck.lost", "onnx_node": None, "onnx_nodes": [], "op": None, "precision": "float"},
        {"name": "backbone.pool", "onnx_node": "/backbone/pool/MaxPool",
         "onnx_nodes": ["/backbone/pool/MaxPool", "/backbone/pool/MaxPool_1"], "op": "MaxPool", "precision": "int8"},
    ],
}


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    layer_info = tmp_path / "model.layers.json"
    layer_info.write_text(json.dumps(LAYER_INFO))
    export_info = tmp_path / "model.json"
    export_info.write_text(json.dumps(INTENDED))
    return {"layer_info": layer_info, "export_info": export_info, "dir": tmp_path}


def _by_name(layers: list[EngineLayer]) -> dict[str, EngineLayer]:
    return {layer.name: layer for layer in layers}


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, expected", [
    ("Int8", "int8"), ("Half", "fp16"), ("Float", "fp32"), ("FP8", "other"), ("BFloat16", "other"),
    (INT8_FMT, "int8"), (FP16_FMT, "fp16"), (FP32_FMT, "fp32"), ("Row major linear FP16 format", "fp16"),
    ("Row major Int8 format", "int8"), ("Int32", "other"), ("UInt8", "other"), ("", "other"), (None, "other"),
])
def test_precision_from_type(text, expected):
    assert precision_from_type(text) == expected


@pytest.mark.parametrize("name, nodes", [
    (STEM, ["/backbone/stem/rbr_reparam/Conv", "/backbone/stem/act/Relu"]),
    ("/a/Conv || /b/Conv", ["/a/Conv", "/b/Conv"]),
    ("/a/Conv + PWN(PWN(/a/act/Sigmoid), /a/act/Mul)", ["/a/Conv", "/a/act/Sigmoid", "/a/act/Mul"]),
    ("PWN(/c/Constant_output_0 + (Unnamed Layer* 882) [Shuffle], /c/Pow)", ["/c/Constant_output_0", "/c/Pow"]),
    ("{ForeignNode[/detect/Reshape.../detect/Concat_3]}", ["/detect/Reshape", "/detect/Concat_3"]),
    ("/x/_input_quantizer/QuantizeLinear", ["/x/_input_quantizer/QuantizeLinear"]),
])
def test_onnx_nodes_from_name(name, nodes):
    assert onnx_nodes_from_name(name) == nodes


def test_read_layer_info_precisions_and_fusions(files):
    layers = read_layer_info(files["layer_info"])
    assert len(layers) == len(LAYER_INFO["Layers"])
    by_name = _by_name(layers)
    stem = by_name[f"/backbone/stem/rbr_reparam/_weight_quantizer/QuantizeLinear + {STEM}"]
    assert (stem.precision, stem.is_conv, stem.is_reformat, stem.layer_type) == ("int8", True, False,
                                                                                 "CaskConvolution")
    assert stem.onnx_nodes == ("/backbone/stem/rbr_reparam/_weight_quantizer/QuantizeLinear",
                               "/backbone/stem/rbr_reparam/Conv", "/backbone/stem/act/Relu")
    reformat = layers[0]
    assert reformat.is_reformat and not reformat.is_conv
    assert reformat.onnx_nodes == ()  # its name quotes the conv it feeds; the conv's nodes are not its own
    fp16 = layers[2]
    assert (fp16.precision, fp16.is_conv) == ("fp16", True)
    assert fp16.onnx_nodes[-1] == "/backbone/ERBlock_2/ERBlock_2.0/act/Relu"
    quantize = by_name["/neck/reduce_layer0/conv/_input_quantizer/QuantizeLinear"]
    assert (quantize.precision, quantize.is_conv, quantize.is_reformat) == ("fp32", False, False)
    assert "/neck/Rep_p4/conv1/Conv" in layers[4].onnx_nodes  # horizontal fusion
    assert by_name["/detect/reg_preds.0/Conv"].precision == "fp32"
    assert layers[-1].precision == "fp16" and layers[-1].layer_type == "Myelin"


def test_metadata_names_are_used_when_the_name_is_opaque():
    layer = {"Name": "__myl_ConvRelu_0", "LayerType": "kgen", "Inputs": [_tensor("x", "Half")],
             "Metadata": "[ONNX Layer: /m/conv/Conv]\x1e[ONNX Layer: /m/act/Relu]"}
    (parsed,) = parse_layer_info({"Layers": [layer]})
    assert parsed.onnx_nodes == ("__myl_ConvRelu_0", "/m/conv/Conv", "/m/act/Relu")
    assert parsed.precision == "fp16"


def test_summarize_counts(files):
    summary = summarize(read_layer_info(files["layer_info"]))
    assert summary == {"engine_layers": 9, "conv_layers": 4, "conv_int8": 2, "conv_fp16": 1, "conv_fp32": 1,
                       "conv_other": 0, "reformat_layers": 1}


# ------------------------------------------------------------------------------------------------ comparison
def test_compare_with_intended(files):
    result = compare_with_intended(read_layer_info(files["layer_info"]), read_export_info(files["export_info"]))
    rows = {row["name"]: row for row in result["layers"]}
    assert [row["name"] for row in result["layers"]] == [layer["name"] for layer in INTENDED["layers"]]
    assert rows["backbone.stem.rbr_reparam"]["status"] == "ok"
    assert rows["backbone.stem.rbr_reparam"]["engine"] == "int8"
    assert rows["detect.reg_preds.0"]["status"] == "ok"
    assert rows["detect.reg_preds.0"]["engine"] == "fp32"
    # intended int8 running fp16, intended float running int8, and a module called twice at two precisions
    assert [row["name"] for row in result["mismatches"]] == [
        "backbone.ERBlock_2.0.rbr_reparam", "neck.reduce_layer0.conv", "backbone.pool"]
    assert rows["backbone.ERBlock_2.0.rbr_reparam"]["engine"] == "fp16"
    assert rows["neck.reduce_layer0.conv"]["engine"] == "int8"
    assert rows["neck.reduce_layer0.conv"]["engine_layer"].startswith("/neck/reduce_layer0/conv/Conv + ")
    assert rows["backbone.pool"]["engine"] == "int8/fp16"
    assert rows["backbone.pool"]["engine_layer"] == "/backbone/pool/MaxPool_1"
    assert result["not_found"] == ["detect.cls_preds.0", "neck.lost"]
    assert rows["neck.lost"]["onnx_node"] is None and rows["neck.lost"]["engine"] is None
    assert (result["intended_layers"], result["matched"], result["mismatch_count"], result["not_found_count"]) == (
        7, 5, 3, 2)
    assert (result["conv_int8"], result["conv_fp16"], result["conv_fp32"], result["reformat_layers"]) == (2, 1, 1, 1)
    json.dumps(result)  # results are plain data

    text = format_report(result)
    assert "backbone.ERBlock_2.0.rbr_reparam" in text and "mismatch" in text
    assert "4 convolutions: 2 INT8, 1 FP16, 1 FP32; 1 reformat layers" in text
    assert "not found" in text and "detect.cls_preds.0" in text


def test_compare_accepts_the_layers_list_and_float_spellings(files):
    layers = read_layer_info(files["layer_info"])
    intended = [{"name": "detect.reg_preds.0", "onnx_node": "/detect/reg_preds.0/Conv", "precision": "fp32"}]
    result = compare_with_intended(layers, intended)
    assert result["layers"][0]["intended"] == "float"
    assert result["mismatch_count"] == 0 and result["matched"] == 1


# ------------------------------------------------------------------------------------------------ bad input
def test_names_only_layer_info_asks_for_detailed_verbosity(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"Layers": ["/a/Conv + /a/Relu", "Reformatting CopyNode for Output Tensor 0"],
                                "Bindings": ["images", "outputs"]}))
    with pytest.raises(InputError, match="--profilingVerbosity=detailed"):
        read_layer_info(path)


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    ("[1, 2]", "not TensorRT layer information"),
    ('{"layers": []}', "not TensorRT layer information"),
    ('{"Layers": [{"LayerType": "Reformat"}]}', r"Layers\[0\]"),
])
def test_bad_layer_info(tmp_path, content, match):
    path = tmp_path / "layers.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match):
        read_layer_info(path)


@pytest.mark.parametrize("data, match", [
    ({"onnx": "model.onnx"}, "no 'layers' list"),
    ({"layers": [{"name": "a", "onnx_node": "/a/Conv", "precision": "int4"}]}, "'int4'"),
    ({"layers": ["/a/Conv"]}, r"layers\[0\]"),
])
def test_bad_export_info(tmp_path, data, match):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=match):
        read_export_info(path)


# ------------------------------------------------------------------------------------------------ engine_report.py
def _report(argv: list[str]) -> dict:
    return engine_report.main(engine_report.get_args_parser().parse_args(argv))


def test_parser():
    parser = engine_report.get_args_parser()
    args = parser.parse_args(["--layer-info", "m.layers.json", "--export-info", "m.json", "--json", "r.json",
                              "--strict"])
    assert (args.layer_info, args.export_info, args.json, args.strict) == ("m.layers.json", "m.json", "r.json", True)
    args = parser.parse_args(["--layer-info", "m.layers.json"])
    assert (args.export_info, args.json, args.strict) == (None, None, False)


def test_parser_requires_layer_info(capsys):
    with pytest.raises(SystemExit) as exc:
        engine_report.get_args_parser().parse_args([])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error:")


def test_report_engine_only(files, capsys):
    result = _report(["--layer-info", str(files["layer_info"])])
    assert result["conv_int8"] == 2 and "mismatches" not in result
    assert "2 INT8, 1 FP16, 1 FP32" in capsys.readouterr().out


def test_report_with_intent_writes_json(files, capsys):
    out = files["dir"] / "report.json"
    result = _report(["--layer-info", str(files["layer_info"]), "--export-info", str(files["export_info"]),
                      "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["mismatch_count"] == result["mismatch_count"] == 3
    assert written["args"]["layer_info"] == str(files["layer_info"])
    assert "backbone.ERBlock_2.0.rbr_reparam" in capsys.readouterr().out


def _run_cli_exit(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(engine_report.main, engine_report.get_args_parser().parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_strict_exits_2_after_writing_the_report(files, capsys):
    out = files["dir"] / "report.json"
    line = _run_cli_exit(["--layer-info", str(files["layer_info"]), "--export-info", str(files["export_info"]),
                          "--json", str(out), "--strict"], capsys)
    assert "3 layer(s)" in line and "neck.reduce_layer0.conv" in line
    assert json.loads(out.read_text())["mismatch_count"] == 3


def test_strict_passes_without_mismatches(files, tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"layers": [INTENDED["layers"][0]]}))
    assert _report(["--layer-info", str(files["layer_info"]), "--export-info", str(ok), "--strict"])[
        "mismatch_count"] == 0


@pytest.mark.parametrize("which", ["missing", "names_only", "strict_without_intent"])
def test_cli_errors_are_one_line(files, tmp_path, capsys, which):
    names_only = tmp_path / "names.json"
    names_only.write_text(json.dumps({"Layers": ["a"], "Bindings": []}))
    argv = {"missing": ["--layer-info", str(tmp_path / "nope.json")],
            "names_only": ["--layer-info", str(names_only)],
            "strict_without_intent": ["--layer-info", str(files["layer_info"]), "--strict"]}[which]
    line = _run_cli_exit(argv, capsys)
    assert {"missing": "does not exist", "names_only": "detailed", "strict_without_intent": "--export-info"}[
        which] in line


def test_script_runs_from_another_directory(files):
    """tools/engine_report.py makes the repository importable itself, from any working directory."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--layer-info",
                           str(files["layer_info"]), "--export-info", str(files["export_info"])],
                          cwd=files["dir"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 at another precision" in proc.stdout


def test_equalization_multiplies_fused_or_separate():
    """An equalized layer's input Mul: fused when the engine layer that runs it has weights (TensorRT's conv +
    point-wise + QuantizeLinear fusion), separate when it runs in a point-wise layer of its own."""
    mul_a, mul_b, mul_c = "/neck/a/Mul", "/neck/b/Mul", "/neck/c/Mul"
    layers = parse_layer_info({"Layers": [
        _conv(f"/neck/p/conv/Conv + /neck/p/act/HardSigmoid + /neck/p/act/Mul + {mul_a}", "Int8", INT8_FMT),
        _conv("/neck/a/conv/Conv", "Int8", INT8_FMT),
        {"Name": f"PWN(/neck/q/act/HardSigmoid, {mul_b})", "LayerType": "PointWiseV2",
         "Inputs": [_tensor("x", FP16_FMT)], "Outputs": [_tensor("y", INT8_FMT)], "ParameterType": "PointWise"},
        _conv("/neck/b/conv/Conv", "Int8", INT8_FMT),
    ]})
    intended = [{"name": "neck.a.conv", "onnx_node": "/neck/a/conv/Conv", "op": "Conv", "precision": "int8",
                 "input_scale_node": mul_a},
                {"name": "neck.b.conv", "onnx_node": "/neck/b/conv/Conv", "op": "Conv", "precision": "int8",
                 "input_scale_node": mul_b},
                {"name": "neck.c.conv", "onnx_node": "/neck/c/conv/Conv", "op": "Conv", "precision": "int8",
                 "input_scale_node": mul_c}]
    result = compare_with_intended(layers, intended)
    assert result["input_scale"] == {"fused": ["neck.a.conv"], "separate": ["neck.b.conv"],
                                     "not_found": ["neck.c.conv"]}
    text = format_report(result)
    assert "1 fused into a conv, 1 run as a layer of their own" in text and "unfused multiply before neck.b.conv" \
        in text
