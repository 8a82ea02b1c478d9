"""Every script on the real COCO-trained YOLOv6Lite-S and a few real COCO images (128 px, a multiple of its stride
64): eval_coco.py, sensitivity_analyse.py (every method), partial_quant.py (every rule, the search on its own set,
the verified Q/DQ ONNX), export_onnx.py (FP32, verified), build_engine.sh --dry-run and train.py."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import onnx
import pytest

import eval_coco
import export_onnx
import partial_quant
import sensitivity_analyse
import train
from tests.helpers import REPO, SHARED_FIXTURES, shared_fixture

LITE_S = SHARED_FIXTURES / "yolov6lite-coco" / "yolov6lite_s_coco_fused.pt"
COCO_REAL = SHARED_FIXTURES / "coco-real"
SIZE = 128
LAYERS = ["neck.Csp_p4.conv_3.block.conv", "detect.cls_preds.0", "detect.reg_preds.3"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _subset(split: str, count: int, out: Path) -> dict[str, str]:
    """The first ``count`` images of a coco-real split (annotations filtered to them)."""
    data = json.loads(shared_fixture(COCO_REAL / f"instances_{split}.json").read_text())
    images = sorted(data["images"], key=lambda i: i["id"])[:count]
    ids = {i["id"] for i in images}
    path = out / f"{split}{count}.json"
    path.write_text(json.dumps({**data, "images": images,
                                "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    return {"json": str(path), "images": str(COCO_REAL / split)}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, dict[str, str]]:
    out = tmp_path_factory.mktemp("coco")
    return {"val": _subset("val", 6, out), "train": _subset("train", 6, out)}


def _main(script, argv: list[str]) -> dict:
    return script.main(script.get_args_parser().parse_args(argv))


def _calibration(real) -> list[str]:
    return ["--data-root", real["train"]["images"], "--batch-size", "4", "--batch-number", "1",
            "--img-size", str(SIZE), "--workers", "0", "--no-progress"]


def test_eval_coco_on_lite(real):
    result = _main(eval_coco, ["--weights", str(shared_fixture(LITE_S)), "--data", real["val"]["json"],
                               "--images", real["val"]["images"], "--img-size", str(SIZE), "--workers", "0",
                               "--no-progress"])
    assert result["images"] == 6 and 0 < result["mAP50_95"] < 1


@pytest.mark.parametrize("method", ["map", "sqnr", "cosine", "mse"])
def test_sensitivity_every_method_on_lite(real, tmp_path, method):
    argv = ["--weights", str(shared_fixture(LITE_S)), *_calibration(real), "--method", method, "--proxy-images",
            "4", "--layers", *LAYERS, "--output", str(tmp_path / "sens")]
    if method == "map":
        argv += ["--data", real["val"]["json"], "--images", real["val"]["images"]]
    result = _main(sensitivity_analyse, argv)
    report = json.loads(Path(result["json"]).read_text())
    assert [row["name"] for row in report["layers"]] == LAYERS
    assert sorted(row["rank"] for row in report["layers"]) == [1, 2, 3]


def test_partial_quant_every_rule_export_and_engine_command(real, tmp_path):
    sens = _main(sensitivity_analyse, ["--weights", str(shared_fixture(LITE_S)), *_calibration(real), "--method",
                                       "sqnr", "--proxy-images", "4", "--output", str(tmp_path / "sens")])
    common = ["--weights", str(LITE_S), "--calib-weights", str(tmp_path / "sens" / "calibrated.pt"),
              "--sensitivity-file", sens["json"], "--data", real["val"]["json"], "--images", real["val"]["images"],
              "--img-size", str(SIZE), "--batch-size", "4", "--workers", "0", "--no-progress"]
    # square: the fixed-size ONNX runs square canvases, so its mAP compares with PyTorch's on the same canvases
    skip = _main(partial_quant, [*common, "--skip-layers", "2", "--eval-onnx", "--letterbox", "square",
                                 "--output-dir", str(tmp_path / "skip")])
    assert skip["int8_layers"] == skip["total_layers"] - 2 == 152
    assert abs(skip["onnx_map"] - skip["partial_map"]) <= 0.05  # 6 images at 128 px: a few boxes move
    graph = onnx.load(skip["onnx"]).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Concat", "GlobalAveragePool", "HardSigmoid", "Resize"} <= ops
    boundary = _main(partial_quant, [*common, "--quant-boundary", "99", "--no-export",
                                     "--output-dir", str(tmp_path / "boundary")])
    assert boundary["int8_layers"] == 100
    search = _main(partial_quant, [*common, "--target-drop", "1.0", "--no-export", "--search-data",
                                   real["train"]["json"], "--search-images", real["train"]["images"],
                                   "--output-dir", str(tmp_path / "search")])
    record = json.loads((tmp_path / "search" / "partial_quant.json").read_text())["search"]
    assert search["int8_layers"] == 154 and record["num_images"] == 6 and not record["same_as_report"]
    trtexec = tmp_path / "trtexec"  # a stand-in: with TRT_MAJOR set, --dry-run only prints the command
    trtexec.write_text("#!/bin/sh\nexit 0\n")
    trtexec.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "build_engine.sh"), skip["onnx"], "--dry-run"], capture_output=True,
                          text=True, env={**os.environ, "TRT_MAJOR": "10", "TRTEXEC": str(trtexec)}, timeout=60)
    assert proc.returncode == 0 and "--int8" in proc.stdout and Path(skip["onnx"]).name in proc.stdout


def test_fp32_export_of_lite_is_verified(real, tmp_path):
    result = _main(export_onnx, ["--weights", str(shared_fixture(LITE_S)), "--img-size", str(SIZE), "--mode", "fp32",
                                 "--output", str(tmp_path / "lite.onnx"), "--verify-images", real["val"]["images"]])
    assert result["precision"] == "fp32" and result["max_abs_diff"]["box"] <= 0.05


def test_train_runs_a_lite_config(real, tmp_path):
    result = _main(train, ["--config", "yolov6lite_s", "--data", real["train"]["json"], "--images",
                           real["train"]["images"], "--val-data", real["val"]["json"], "--val-images",
                           real["val"]["images"], "--img-size", str(SIZE), "--epochs", "1", "--batch-size", "2",
                           "--workers", "0", "--warmup-epochs", "0", "--output-dir", str(tmp_path / "train"),
                           "--no-progress"])
    assert (tmp_path / "train" / "last.pt").is_file() and 0 <= result["mAP50_95"] <= 1


def test_equalized_pipeline_on_lite(real, tmp_path, capsys):
    """--equalize / --bias-correction from calibration to the Q/DQ ONNX and fine-tuning: every script carries the
    transform (calibrated.pt -> partial.pt -> ONNX multiplies -> qat.pt)."""
    from utils.quant import calibration, equalize
    from utils.quant import quantizers as quant

    sens = _main(sensitivity_analyse, ["--weights", str(shared_fixture(LITE_S)), *_calibration(real), "--method",
                                       "sqnr", "--proxy-images", "4", "--layers", *LAYERS, "--equalize",
                                       "depthwise", "--bias-correction", "--output", str(tmp_path / "sens")])
    calibrated = calibration.load_calibrated(tmp_path / "sens" / "calibrated.pt")
    scaled = equalize.equalized_layers(calibrated)
    assert len(scaled) == 42 and all(equalize.layer_kind(m) == "depthwise" for m in scaled.values())
    assert calibrated.quant_transform["bias_correction"]
    partial = _main(partial_quant, ["--weights", str(LITE_S), "--calib-weights", str(tmp_path / "sens" /
                                    "calibrated.pt"), "--sensitivity-file", sens["json"], "--skip-layers", "1",
                                    "--data", real["val"]["json"], "--images", real["val"]["images"], "--img-size",
                                    str(SIZE), "--batch-size", "4", "--workers", "0", "--no-progress", "--eval-onnx",
                                    "--letterbox", "square",
                                    "--output-dir", str(tmp_path / "partial")])
    summary = capsys.readouterr().out
    assert "inputs of 42 depthwise convs equalized" in summary and "bias corrected on" in summary
    report = json.loads((tmp_path / "partial" / "partial_quant.json").read_text())
    assert report["calibration"]["transform"]["equalize"]["multiplies"] + \
        report["calibration"]["transform"]["equalize"]["folded"] == 42
    record = json.loads(Path(partial["onnx"]).with_suffix(".json").read_text())
    model = calibration.load_calibrated(tmp_path / "partial" / "partial.pt")
    int8_scaled = {n for n, m in equalize.equalized_layers(model).items() if n not in quant.float_layers(model)}
    assert record["qdq"]["input_scale_mul"] == len(int8_scaled) >= 41
    assert {r["name"] for r in record["layers"] if "input_scale_node" in r} == int8_scaled
    assert abs(partial["onnx_map"] - partial["partial_map"]) <= 0.05
    qat = _main(train, ["--qat", "--weights", str(tmp_path / "partial" / "partial.pt"), "--images",
                        real["train"]["images"], "--max-images", "4", "--img-size", str(SIZE), "--epochs", "1",
                        "--batch-size", "2", "--workers", "0", "--output-dir", str(tmp_path / "qat"), "--no-progress"])
    tuned = calibration.load_calibrated(tmp_path / "qat" / "qat.pt")
    assert set(equalize.equalized_layers(tuned)) == set(scaled) and qat["int8_layers"] == 153
