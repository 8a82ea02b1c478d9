"""End-to-end evaluation: oracle predictions give mAP 1, a .pt and its .onnx give the same mAP, bad input exits 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_coco
import export_onnx
from models import build_model, load_config, save_checkpoint
from models.config import with_overrides
from tests.helpers import one_line_error
from utils.cli import run_cli
from utils.data.coco import CocoDetection
from utils.data.synthetic import generate_synthetic_coco
from utils.errors import InputError
from utils.inference.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
IMG_SIZE = 320


def _run_expect_exit_2(argv: list[str], capsys) -> str:
    return one_line_error(eval_coco, argv, capsys)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synthetic")
    info = generate_synthetic_coco(out, num_train=0, num_val=24, img_size=IMG_SIZE, seed=3)
    return {"json": info["val"]["ann_file"], "images": info["val"]["img_dir"], "dir": out}


@pytest.fixture(scope="module")
def checkpoint(synthetic, tmp_path_factory) -> Path:
    """An untrained 6-class yolov6n whose prediction layers are perturbed so that it outputs real detections."""
    torch.manual_seed(0)
    config = with_overrides(load_config("yolov6n"), num_classes=6)
    model = build_model(config).eval()
    with torch.no_grad():
        for conv in model.detect.cls_preds:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.5)
        for conv in model.detect.reg_preds:  # positive ltrb distances of 1-4 strides: boxes of every size
            conv.weight.normal_(0, 0.02)
            conv.bias.uniform_(1.0, 4.0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model)


class OracleRunner:
    """Returns raw predictions built from the ground truth of the images in loader order."""

    name, input_hw = "oracle", None

    def __init__(self, dataset: CocoDetection, shift: float = 0.0):
        self.items = iter(range(len(dataset)))
        self.dataset, self.shift = dataset, shift

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        nc = len(self.dataset.cat_ids)
        out = torch.zeros(len(images), 100, 5 + nc)
        for b in range(len(images)):
            targets = self.dataset[next(self.items)]["targets"]
            for j, (cls, x1, y1, x2, y2) in enumerate(targets.tolist()):
                out[b, j, :4] = torch.tensor([(x1 + x2) / 2 + self.shift, (y1 + y2) / 2, x2 - x1, y2 - y1])
                out[b, j, 4] = 1.0
                out[b, j, 5 + int(cls)] = 0.9
        return out


def test_oracle_predictions_score_perfect_map(synthetic):
    dataset = CocoDetection(synthetic["json"], synthetic["images"], img_size=IMG_SIZE)
    metrics = evaluate(OracleRunner(dataset), dataset, batch_size=5, workers=0, progress=False)
    assert metrics["mAP50_95"] == pytest.approx(1.0)
    assert metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["images"] == len(dataset) and metrics["unreadable"] == 0


def test_shifted_oracle_loses_map(synthetic):
    dataset = CocoDetection(synthetic["json"], synthetic["images"], img_size=IMG_SIZE)
    metrics = evaluate(OracleRunner(dataset, shift=6.0), dataset, batch_size=4, workers=0, progress=False)
    assert metrics["mAP50_95"] < 0.95


def _eval_args(weights, synthetic, tmp_path, *extra) -> list[str]:
    return ["--weights", str(weights), "--data", str(synthetic["json"]), "--images", str(synthetic["images"]),
            "--img-size", str(IMG_SIZE), "--batch-size", "4", "--workers", "0", "--no-progress", *extra]


def test_pt_and_onnx_give_the_same_map(checkpoint, synthetic, tmp_path, capsys):
    onnx_path = tmp_path / "tiny.onnx"
    exported = export_onnx.main(export_onnx.get_args_parser().parse_args(
        ["--weights", str(checkpoint), "--output", str(onnx_path), "--img-size", str(IMG_SIZE), "--dynamic-batch",
         "--verify-images", str(synthetic["images"])]))
    assert onnx_path.is_file() and exported["max_abs_diff"]["score"] < 1e-4
    parser = eval_coco.get_args_parser()
    pt = eval_coco.main(parser.parse_args(_eval_args(checkpoint, synthetic, tmp_path, "--letterbox", "square",
                                                     "--save-json", str(tmp_path / "pt.json"),
                                                     "--results", str(tmp_path / "pt_results.json"))))
    ox = eval_coco.main(parser.parse_args(_eval_args(onnx_path, synthetic, tmp_path,
                                                     "--save-json", str(tmp_path / "onnx.json"))))
    assert pt["mAP50_95"] > 0  # the perturbed head really detects something, so the comparison means something
    assert abs(pt["mAP50_95"] - ox["mAP50_95"]) <= 0.002 and abs(pt["mAP50"] - ox["mAP50"]) <= 0.002
    pt_dets = json.loads((tmp_path / "pt.json").read_text())
    onnx_dets = json.loads((tmp_path / "onnx.json").read_text())
    assert abs(len(pt_dets) - len(onnx_dets)) <= max(2, len(pt_dets) // 100)
    saved = json.loads((tmp_path / "pt_results.json").read_text())
    for key in ("mAP50", "mAP50_95", "images", "seconds", "images_per_s"):
        assert key in saved
    assert saved["images"] == 24
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in capsys.readouterr().out
    # the geometry each used, by default: YOLOv6's rect for PyTorch, square for the fixed-size ONNX model
    assert (pt["letterbox"], ox["letterbox"]) == ("square", "square")
    rect = eval_coco.main(parser.parse_args(_eval_args(checkpoint, synthetic, tmp_path)))
    assert rect["letterbox"] == "rect" and rect["images"] == 24
    with pytest.raises(InputError, match="--letterbox square"):
        eval_coco.main(parser.parse_args(_eval_args(onnx_path, synthetic, tmp_path, "--letterbox", "rect")))


def test_max_images_limits_the_evaluation(checkpoint, synthetic, tmp_path):
    result = eval_coco.main(eval_coco.get_args_parser().parse_args(
        _eval_args(checkpoint, synthetic, tmp_path, "--max-images", "5")))
    assert result["images"] == 5


def test_bad_inputs_exit_2_with_one_line(checkpoint, synthetic, tmp_path, capsys, monkeypatch):
    assert "not found" in _run_expect_exit_2(_eval_args(tmp_path / "nope.pt", synthetic, tmp_path), capsys)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in _run_expect_exit_2(_eval_args(text, synthetic, tmp_path), capsys)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    argv = _eval_args(checkpoint, synthetic, tmp_path)
    argv[argv.index("--data") + 1] = str(bad_json)
    assert "not a COCO annotation JSON" in _run_expect_exit_2(argv, capsys)
    argv[argv.index("--data") + 1] = str(tmp_path / "missing.json")
    assert "not found" in _run_expect_exit_2(argv, capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = _eval_args(checkpoint, synthetic, tmp_path)
    argv[argv.index("--images") + 1] = str(empty)
    assert "empty" in _run_expect_exit_2(argv, capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cpu" in _run_expect_exit_2(_eval_args(checkpoint, synthetic, tmp_path, "--device", "cuda:0"),
                                                capsys)


def test_wrong_class_count_is_a_clear_error(synthetic, tmp_path, capsys):
    model = build_model(load_config("yolov6n")).eval()  # 80 classes, the dataset has 6
    weights = save_checkpoint(tmp_path / "coco80.pt", model)
    assert "80 classes" in _run_expect_exit_2(_eval_args(weights, synthetic, tmp_path), capsys)


@pytest.mark.parametrize("extra, message", [(["--img-size", "300"], "multiple of 32"),
                                            (["--conf", "1.5"], "[0, 1]"),
                                            (["--device", "tpu"], "cpu, cuda")])
def test_bad_options_exit_2_from_a_real_process(synthetic, tmp_path, extra, message):
    argv = ["--weights", "w.pt", "--data", "d.json", "--images", "."] + extra
    proc = subprocess.run([sys.executable, str(REPO / "eval_coco.py"), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert message in proc.stderr


def test_unsafe_pickle_is_refused_through_the_cli(synthetic, tmp_path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.pt"
    script = ("import os, torch\n"
              "class Evil:\n"
              f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
              f"torch.save({{'model': Evil()}}, {str(payload)!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    proc = subprocess.run([sys.executable, str(REPO / "eval_coco.py"), *_eval_args(payload, synthetic, tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "system" in proc.stderr and "nothing was executed" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_export_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    target = tmp_path / "exists.onnx"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        run_cli(export_onnx.main, export_onnx.get_args_parser().parse_args(
            ["--weights", str(checkpoint), "--output", str(target), "--img-size", "64"]))
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_a_calibrated_checkpoint_is_evaluated_fake_quantized(synthetic, tmp_path):
    """calibrated.pt (here equalized, 4-bit so that quantization visibly moves mAP) runs as its fake-quantized model;
    --float runs its float function, which equalization leaves equal to the original model's."""
    from models import load_model
    from utils.data.calibration import calibration_loader
    from utils.inference.runners import TorchRunner
    from utils.quant import calibration
    from utils.quant.equalize import TransformSettings

    bundled = REPO / "assets" / "yolov6n_synthetic.pt"  # trained: its mAP is far from zero
    loader = calibration_loader(synthetic["images"], IMG_SIZE, 4, 2, workers=0)
    qmodel, _ = calibration.calibrated_model(load_model(bundled), loader=loader, batch_number=2, num_bits=4,
                                             transform=TransformSettings("all", alpha=0.5))
    path = calibration.save_calibrated(tmp_path / "calibrated.pt", qmodel)
    dataset = CocoDetection(synthetic["json"], synthetic["images"], img_size=IMG_SIZE)
    expected_int = evaluate(TorchRunner(qmodel), dataset, batch_size=8, workers=0, progress=False)["mAP50_95"]
    expected_float = evaluate(TorchRunner(load_model(bundled)), dataset, batch_size=8, workers=0,
                              progress=False)["mAP50_95"]
    parser = eval_coco.get_args_parser()
    got = eval_coco.main(parser.parse_args(_eval_args(path, synthetic, tmp_path, "--letterbox", "square")))
    got_float = eval_coco.main(parser.parse_args(_eval_args(path, synthetic, tmp_path, "--float", "--letterbox",
                                                            "square")))
    assert got["backend"] == "pytorch fake-quant int8" and got["mAP50_95"] == pytest.approx(expected_int, abs=1e-6)
    assert got_float["mAP50_95"] == pytest.approx(expected_float, abs=1e-4)
    assert expected_float > 0.3 and abs(expected_int - expected_float) > 1e-3  # really two different models


def test_baseline_comparison_of_models_and_saved_predictions(checkpoint, synthetic, tmp_path, capsys):
    parser = eval_coco.get_args_parser()
    saved = tmp_path / "pt.json"
    eval_coco.main(parser.parse_args(_eval_args(checkpoint, synthetic, tmp_path, "--save-json", str(saved))))
    # a model against its own saved predictions: the same detections, so no drop and no spread
    same = eval_coco.main(parser.parse_args(_eval_args(checkpoint, synthetic, tmp_path, "--baseline", str(saved),
                                                       "--resamples", "20")))
    assert same["compare"]["mAP50_95"] == {**same["compare"]["mAP50_95"], "drop": 0.0, "low": 0.0, "high": 0.0}
    assert "drop vs" in capsys.readouterr().out
    # saved predictions against saved predictions: the ground truth itself (mAP 1), and the same without the boxes
    # of the second half of the images
    annotations = json.loads(Path(synthetic["json"]).read_text())["annotations"]
    oracle = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
              for a in annotations]
    (tmp_path / "oracle.json").write_text(json.dumps(oracle))
    cut = sorted({a["image_id"] for a in annotations})[11]
    (tmp_path / "half.json").write_text(json.dumps([p for p in oracle if p["image_id"] <= cut]))
    worse = eval_coco.main(parser.parse_args(_eval_args(tmp_path / "half.json", synthetic, tmp_path, "--baseline",
                                                        str(tmp_path / "oracle.json"))))
    assert worse["backend"] == "saved predictions" and worse["compare"]["baseline"]["mAP50_95"] == 1.0
    drop = worse["compare"]["mAP50_95"]
    assert drop["drop"] == pytest.approx(1.0 - worse["mAP50_95"]) and drop["drop"] > 0.3
    assert drop["low"] < drop["drop"] < drop["high"]
    with pytest.raises(InputError, match="not a COCO results list"):
        (tmp_path / "bad.json").write_text("{}")
        eval_coco.main(parser.parse_args(_eval_args(checkpoint, synthetic, tmp_path, "--baseline",
                                                    str(tmp_path / "bad.json"))))

