"""Tests for partial_quant.py and export_onnx.py end to end on the bundled demo model: the exported graph has one
scale per Concat/MaxPool group, ONNX Runtime mAP agrees with PyTorch fake-quant, and bad input gives one-line
errors with nothing written."""
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
from utils.cli import run_cli
from utils.data.coco import CocoDetection
from utils.data.synthetic import generate_synthetic_coco
from utils.inference.evaluate import evaluate
from utils.inference.runners import TorchRunner
from utils.quant import calibration
from utils.quant import quantizers as quant

pytestmark = pytest.mark.usefixtures("one_thread")


REPO = Path(__file__).resolve().parents[1]


BUNDLED = REPO / "assets" / "yolov6n_synthetic.pt"


SIZE = 320


# ------------------------------------------------------------------------------------ partial_quant end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    info = generate_synthetic_coco(root, num_train=16, num_val=12, img_size=SIZE, seed=5)
    return {"json": str(info["val"]["ann_file"]), "images": str(info["val"]["img_dir"]),
            "train": str(info["train"]["img_dir"]), "train_json": str(info["train"]["ann_file"])}


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
    # the ONNX takes fixed square inputs: it runs square canvases, beside the rect ones of every PyTorch row
    assert report["letterbox"] == "rect" and report["onnx_letterbox"] == "square"
    reloaded = calibration.load_calibrated(tmp_path / "out" / "partial.pt")
    square = CocoDetection(data["json"], data["images"], img_size=SIZE)
    partial_square = evaluate(TorchRunner(reloaded), square, batch_size=8, workers=0, progress=False)["mAP50_95"]
    # 12 images: a flipped INT8 level moves a box of one image; 200 images (make demo) agree within 0.002
    assert result["fp_map"] > 0.3 and abs(result["onnx_map"] - partial_square) <= 0.01
    # every reported drop carries its paired-bootstrap interval over the report images, the ONNX's from the float
    # model on the same square canvases
    for row, reference, value in (("ptq", "fp_map", result["ptq_map"]), ("partial", "fp_map", result["partial_map"]),
                                  ("onnx", "fp_square_map", result["onnx_map"])):
        drop = report["intervals"][row]["mAP50_95"]
        assert drop["drop"] == round(result[reference] - value, 4) and drop["low"] <= drop["drop"] <= drop["high"]
    record = json.loads(Path(result["onnx"]).with_suffix(".json").read_text())
    assert record["qdq"]["conv_transpose_weight_axes"] == [0] and record["qdq"]["conv_weight_axes"] == [0]
    assert {r["name"] for r in record["layers"] if r["precision"] == "float"} == set(heads)
    assert onnx.load(result["onnx"]).graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert _concat_scales_agree(Path(result["onnx"])) >= 3
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


@pytest.mark.slow
def test_target_drop_searches_on_its_own_set_and_reports_on_the_other(data, ranking, tmp_path, caplog):
    out = tmp_path / "split"
    result = _run(_argv(data, ranking, out, "--target-drop", "0.5", "--no-export",
                        "--search-data", data["train_json"], "--search-images", data["train"]))
    report = json.loads((out / "partial_quant.json").read_text())
    search = report["search"]
    assert not search["same_as_report"] and search["num_images"] == 16 and search["images"] == data["train"]
    assert report["steps"][0]["map"] == search["ptq_map"] and search["fp_map"] != report["fp_map"]
    # the reported partial mAP is that of the saved model on the report set, measured independently here
    model = calibration.load_calibrated(out / "partial.pt")
    dataset = CocoDetection(data["json"], data["images"], img_size=SIZE, letterbox="rect", stride=model.max_stride)
    independent = evaluate(TorchRunner(model), dataset, batch_size=8, workers=0, progress=False)["mAP50_95"]
    assert result["partial_map"] == independent
    assert "optimistic" not in caplog.text
    same = _run(_argv(data, ranking, tmp_path / "same", "--target-drop", "0.5", "--no-export",
                      "--calib-weights", str(out / "partial.pt")))
    assert json.loads((tmp_path / "same" / "partial_quant.json").read_text())["search"]["same_as_report"]
    assert "optimistic" in caplog.text and same["partial_map"] == same["ptq_map"]  # 0.5: full PTQ is within budget


@pytest.mark.slow
def test_upper_rule_stops_when_the_whole_interval_is_within_budget(data, ranking, tmp_path):
    """--stop-on upper: the search judges each float set by the upper end of its drop's 95 % interval on the
    search images, so the chosen set's whole interval is within the budget; the report states that interval and
    the interval it predicts for the report images."""
    out = tmp_path / "upper"
    _run(_argv(data, ranking, out, "--target-drop", "0.02", "--no-export", "--stop-on", "upper",
               "--search-data", data["train_json"], "--search-images", data["train"]))
    report = json.loads((out / "partial_quant.json").read_text())
    search, steps = report["search"], report["steps"]
    measured = search["drop_interval"]
    assert search["stop_on"] == "upper" and measured["low"] <= measured["drop"] <= measured["high"] <= 0.02
    assert round(search["fp_map"] - search["partial_map"], 4) == measured["drop"]
    # the steps' drops are upper ends: the accepted set's is the one stated
    assert any(abs(s["drop"] - measured["high"]) < 1e-4 for s in steps if s["drop"] <= 0.02)
    predicted = search["predicted_report_interval"]  # 16 search images predicting 12 others: wider
    assert predicted["low"] < measured["low"] and predicted["high"] > measured["high"]
    assert predicted["drop"] == measured["drop"]


@pytest.mark.slow
def test_rerank_search_needs_no_ranking_and_few_map_evaluations(data, tmp_path):
    """--rerank: the float set is a prefix of the proxy-greedy sequence (revert pass aside), within budget on the
    search set, with the mAP checks at 0, 1, 2, 4, ... float layers; the reported mAP is the saved model's."""
    out = tmp_path / "rerank"
    argv = _argv(data, "unused", out, "--target-drop", "0.0", "--rerank", "sqnr", "--rerank-pool", "4",
                 "--proxy-images", "8", "--no-export", "--search-data", data["train_json"], "--search-images",
                 data["train"])
    argv.remove("--sensitivity-file")
    argv.remove("unused")
    result = _run(argv)
    report = json.loads((out / "partial_quant.json").read_text())
    search, steps = report["search"], report["steps"]
    assert report["rule"] == "target-drop 0.0 (re-ranked by sqnr)"
    checks = [s["float_layers"] for s in steps if s["action"] in ("ptq", "check")]
    assert checks[:3] == [0, 1, 2][:len(checks[:3])] and search["evaluations"] == len(steps)
    assert search["probes"] >= 72 and set(report["float_layers"]) <= set(search["sequence"])
    kept = [s for s in steps if s["action"] in ("keep-float", "requantize")]
    assert kept and all(s["drop"] <= 0.0 for s in steps if s["action"] == "requantize")
    model = calibration.load_calibrated(out / "partial.pt")
    assert quant.float_layers(model) == sorted(report["float_layers"], key=list(quant.quant_layers(model)).index)
    dataset = CocoDetection(data["json"], data["images"], img_size=SIZE, letterbox="rect", stride=model.max_stride)
    assert result["partial_map"] == evaluate(TorchRunner(model), dataset, batch_size=8, workers=0,
                                             progress=False)["mAP50_95"]


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
    assert "--entropy-stride" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--skip-layers", "1",
                                                                   "--entropy-stride", "0"), capsys)
    assert "--equalize-alpha" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--skip-layers", "1",
                                                                   "--equalize", "all", "--equalize-alpha", "2"),
                                         capsys)
    assert "brings its own" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--skip-layers", "1",
                                                                 "--calib-weights", str(ranking), "--equalize",
                                                                 "depthwise"), capsys)
    assert "together" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--target-drop", "0.1",
                                                           "--search-data", data["train_json"]), capsys)
    assert "--target-drop only" in _exit_2(partial_quant.main, _argv(
        data, ranking, out, "--skip-layers", "1", "--search-data", data["train_json"], "--search-images",
        data["train"]), capsys)
    assert "drop --sensitivity-file" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--target-drop", "0.1",
                                                                         "--rerank", "sqnr"), capsys)
    assert "--target-drop only" in _exit_2(partial_quant.main, _argv(data, ranking, out, "--skip-layers", "1",
                                                                     "--rerank", "sqnr"), capsys)
    no_file = [a for a in _argv(data, ranking, out, "--skip-layers", "1") if a not in ("--sensitivity-file",
                                                                                     str(ranking))]
    assert "pass --sensitivity-file" in _exit_2(partial_quant.main, no_file, capsys)
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
    calibration.calibrate(model, [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))], 1)
    quant.disable_all(model)
    path = calibration.save_calibrated(tmp_path / "float.pt", model)
    assert "every layer in float" in _exit_2(export_onnx.main, ["--weights", str(path), "--img-size", "64",
                                                                "--output", str(tmp_path / "f.onnx")], capsys)
    result = export_onnx.main(export_onnx.get_args_parser().parse_args(
        ["--weights", str(path), "--img-size", "64", "--mode", "fp32", "--output", str(tmp_path / "f.onnx")]))
    assert result["precision"] == "fp32" and result["max_abs_diff"]["box"] <= 0.05
