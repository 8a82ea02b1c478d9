"""Tests for quantizer sharing (utils/quant_sharing.py), the Q/DQ export (utils/onnx_export.py, export_onnx.py) and
partial_quant.py end to end on the bundled demo model: groups traced from v2 RepOpt and v3 layouts equal YOLOv6's own
hand-written list / the architecture, the exported graph has one scale per Concat/MaxPool group, ONNX Runtime mAP
agrees with PyTorch fake-quant, and bad input gives one-line errors with nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import export_onnx
import partial_quant
from models import build_model, load_config, reparameterize
from utils import quantization as quant
from utils.cli import run_cli
from utils.quant_sharing import input_amax, share_input_amax, trace_sharing_groups
from utils.synthetic import generate_synthetic_coco

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "yolov6n_synthetic.pt"
SIZE = 320

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


def _quantized(config: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return quant.quantize_model(reparameterize(build_model(load_config(config)).eval()))


# ------------------------------------------------------------------------------------------------------ sharing
@pytest.mark.parametrize("config, expected", [("yolov6n_reopt", REOPT_GROUPS), ("yolov6n", V3_GROUPS)])
def test_sharing_groups_are_traced_from_the_model(config, expected):
    groups = trace_sharing_groups(_quantized(config))
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected))


def test_shared_amax_is_the_max_over_int8_members_and_follows_the_float_set():
    model = _quantized("yolov6n")
    quant.calibrate(model, [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))], 1)
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


# ------------------------------------------------------------------------------------ partial_quant end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    info = generate_synthetic_coco(root, num_train=16, num_val=12, img_size=SIZE, seed=5)
    return {"json": str(info["val"]["ann_file"]), "images": str(info["val"]["img_dir"]),
            "train": str(info["train"]["img_dir"])}


@pytest.fixture(scope="module")
def ranking(tmp_path_factory) -> Path:
    """A seed-format ranking (layer mAP50 mAP50:95) in which the detect head is the most sensitive part."""
    names = list(quant.quant_layers(quant.quantize_model(_bundled())))
    lines = [f"{name} 0.8 {0.5 if name.startswith('detect') else 0.6 + i * 1e-4:.4f}" for i, name in enumerate(names)]
    path = tmp_path_factory.mktemp("rank") / "sensitivity.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _bundled() -> torch.nn.Module:
    from models import load_model

    return load_model(BUNDLED)


def _argv(data, ranking, out, *extra) -> list[str]:
    return ["--weights", str(BUNDLED), "--data-root", data["train"], "--batch-size", "8", "--batch-number", "2",
            "--img-size", str(SIZE), "--data", data["json"], "--images", data["images"], "--workers", "0",
            "--sensitivity-file", str(ranking), "--output-dir", str(out), "--no-progress", *extra]


def _run(argv: list[str]) -> dict:
    return partial_quant.main(partial_quant.get_args_parser().parse_args(argv))


def _concat_scales_agree(path: Path) -> int:
    """Every QuantizeLinear reading a Concat's inputs or output, or a MaxPool's, has one scale: the number checked."""
    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    readers: dict[str, list[float]] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            readers.setdefault(node.input[0], []).append(float(np.asarray(consts[node.input[1]]).reshape(-1)[0]))
    checked = 0
    for node in graph.node:
        if node.op_type in ("Concat", "MaxPool"):
            scales = {s for t in list(node.input) + list(node.output) for s in readers.get(t, [])}
            assert len(scales) <= 1, (node.name, scales)
            checked += bool(scales)
    return checked


@pytest.mark.slow
def test_partial_quant_skip_layers_end_to_end(data, ranking, tmp_path):
    result = _run(_argv(data, ranking, tmp_path / "out", "--skip-layers", "3", "--eval-onnx"))
    report = json.loads((tmp_path / "out" / "partial_quant.json").read_text())
    heads = ["detect.stems.0.block.conv", "detect.stems.1.block.conv", "detect.stems.2.block.conv"]  # ties: model order
    assert report["float_layers"] == heads and result["int8_layers"] == result["total_layers"] - 3 == 69
    # 12 images: a flipped INT8 level moves a box of one image; 200 images (make demo) agree within 0.002
    assert result["fp_map"] > 0.3 and abs(result["onnx_map"] - result["partial_map"]) <= 0.01
    record = json.loads(Path(result["onnx"]).with_suffix(".json").read_text())
    assert record["qdq"]["conv_transpose_weight_axes"] == [0] and record["qdq"]["conv_weight_axes"] == [0]
    assert {r["name"] for r in record["layers"] if r["precision"] == "float"} == set(heads)
    assert onnx.load(result["onnx"]).graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert _concat_scales_agree(Path(result["onnx"])) >= 3
    reloaded = quant.load_calibrated(tmp_path / "out" / "partial.pt")
    assert quant.float_layers(reloaded) == heads


@pytest.mark.slow
def test_partial_quant_target_drop_and_boundary(data, ranking, tmp_path):
    out = tmp_path / "search"
    result = _run(_argv(data, ranking, out, "--target-drop", "0.0", "--no-export"))
    report = json.loads((out / "partial_quant.json").read_text())
    assert report["steps"][0]["action"] == "ptq" and report["partial_drop"] <= 0.0
    assert result["int8_layers"] + len(report["float_layers"]) == result["total_layers"]
    boundary = _run(_argv(data, ranking, tmp_path / "boundary", "--quant-boundary", "9", "--no-export",
                          "--calib-weights", str(out / "partial.pt")))
    assert boundary["int8_layers"] == 10  # indices 0..9 of the least-to-most sensitive list


def _exit_2(main, argv, capsys) -> str:
    module = partial_quant if main is partial_quant.main else export_onnx
    with pytest.raises(SystemExit) as exc:
        run_cli(main, module.get_args_parser().parse_args(argv))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert err[-1].startswith("error:") and sum(line.startswith("error:") for line in err) == 1
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_bad_inputs_exit_2(data, ranking, tmp_path, capsys):
    out = tmp_path / "bad"
    other = tmp_path / "other.txt"
    other.write_text("backbone.not_a_layer 0.8 0.6\n")
    assert "does not have" in _exit_2(partial_quant.main, _argv(data, other, out, "--skip-layers", "1"), capsys)
    assert "out of range" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--skip-layers", "999"), capsys)
    assert "out of range" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--quant-boundary", "72"), capsys)
    assert "between 0 and 1" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--target-drop", "5"), capsys)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "choose another --output-dir" in _exit_2(
        partial_quant.main, _argv(data, ranking, blocker / "sub", "--skip-layers", "1"), capsys)
    out.mkdir()
    (out / "partial.pt").write_text("x")
    assert "--overwrite" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--skip-layers", "1"), capsys)
    assert (out / "partial.pt").read_text() == "x" and sorted(p.name for p in out.iterdir()) == ["partial.pt"]
    assert "calibrated checkpoint" in _exit_2(
        export_onnx.main, ["--weights", str(BUNDLED), "--mode", "qdq", "--output", str(tmp_path / "m.onnx")], capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_qdq_export_of_an_all_float_model_is_refused(tmp_path, capsys):
    model = quant.quantize_model(_bundled())
    quant.calibrate(model, [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))], 1)
    quant.disable_all(model)
    path = quant.save_calibrated(tmp_path / "float.pt", model)
    assert "every layer in float" in _exit_2(export_onnx.main, ["--weights", str(path), "--img-size", "64",
                                                                "--output", str(tmp_path / "f.onnx")], capsys)
    result = export_onnx.main(export_onnx.get_args_parser().parse_args(
        ["--weights", str(path), "--img-size", "64", "--mode", "fp32", "--output", str(tmp_path / "f.onnx")]))
    assert result["precision"] == "fp32" and result["max_abs_diff"]["box"] <= 0.05
