"""Every file argument of every script against the bad files users meet: missing, empty, corrupt (random bytes) and
foreign (a valid file of another kind). Each must end in one ``error:`` line, exit code 2, no traceback; and
nothing may be written where the run's results go."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import eval_coco
import export_onnx
import partial_quant
import sensitivity_analyse
import train
from models import reparameterize
from tests.helpers import SIZE, one_line_error, tiny_detector
from utils.quant.calibration import calibrated_model, save_calibrated

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("missing", "empty", "corrupt", "foreign")


@pytest.fixture(scope="module")
def files(tiny_val, tiny_checkpoint, tmp_path_factory) -> dict:
    """Good inputs for every script, and one bad file of each kind for each expected type."""
    root = tmp_path_factory.mktemp("bad")
    from utils.data.calibration import calibration_loader

    loader = calibration_loader(tiny_val["images"], SIZE, 4, 1, workers=0)
    qmodel, _ = calibrated_model(reparameterize(tiny_detector()), loader=loader, batch_number=1)
    calib = save_calibrated(root / "calibrated.pt", qmodel)
    ranking = root / "ranking.txt"
    ranking.write_text("".join(f"{name} 0.5 0.{i}\n" for i, name in enumerate(
        ["detect.cls_preds.0", "detect.reg_preds.0"])))
    image = root / "picture.jpg"
    cv2.imwrite(str(image), np.full((8, 8, 3), 127, np.uint8))
    bad = {"missing": root / "does_not_exist.pt", "empty": root / "empty.bin", "corrupt": root / "corrupt.bin"}
    bad["empty"].write_bytes(b"")
    bad["corrupt"].write_bytes(np.random.default_rng(0).bytes(2048))
    return {"root": root, "weights": str(tiny_checkpoint), "calib": str(calib), "ranking": str(ranking),
            "json": tiny_val["json"], "images": tiny_val["images"], "bad": bad,
            # a valid file of another kind for each expected kind
            "foreign": {"pt": tiny_val["json"], "json": str(calib), "txt": str(image), "calib": str(tiny_checkpoint)}}


def _cases(f: dict) -> list[tuple]:
    """(script, argv with {BAD} where the bad file goes, what kind of file belongs there)."""
    out = str(f["root"] / "out")
    common = ["--img-size", str(SIZE), "--batch-size", "4", "--workers", "0", "--no-progress"]
    return [
        (eval_coco, ["--weights", "{BAD}", "--data", f["json"], "--images", f["images"], *common], "pt"),
        (eval_coco, ["--weights", f["weights"], "--data", "{BAD}", "--images", f["images"], *common], "json"),
        (export_onnx, ["--weights", "{BAD}", "--img-size", str(SIZE), "--output", out + "/m.onnx"], "pt"),
        (sensitivity_analyse, ["--weights", "{BAD}", "--data-root", f["images"], "--output", out, *common,
                               "--batch-number", "1", "--proxy-images", "4"], "pt"),
        (sensitivity_analyse, ["--weights", f["weights"], "--calib-weights", "{BAD}", "--data-root", f["images"],
                               "--output", out, *common, "--proxy-images", "4"], "calib"),
        (sensitivity_analyse, ["--weights", f["weights"], "--calib-weights", f["calib"], "--method", "map",
                               "--data", "{BAD}", "--images", f["images"], "--output", out, *common], "json"),
        (partial_quant, ["--weights", f["weights"], "--calib-weights", "{BAD}", "--sensitivity-file", f["ranking"],
                         "--skip-layers", "1", "--output-dir", out, "--no-export", *common], "calib"),
        (partial_quant, ["--weights", f["weights"], "--calib-weights", f["calib"], "--sensitivity-file", "{BAD}",
                         "--skip-layers", "1", "--output-dir", out, "--no-export", *common], "txt"),
        (partial_quant, ["--weights", f["weights"], "--calib-weights", f["calib"], "--sensitivity-file",
                         f["ranking"], "--skip-layers", "1", "--data", "{BAD}", "--images", f["images"],
                         "--output-dir", out, "--no-export", *common], "json"),
        (train, ["--qat", "--weights", "{BAD}", "--images", f["images"], "--output-dir", out, "--epochs", "1",
                 "--img-size", str(SIZE), "--workers", "0", "--no-progress"], "calib"),
        (train, ["--data", "{BAD}", "--images", f["images"], "--val-data", f["json"], "--val-images", f["images"],
                 "--output-dir", out, "--epochs", "1", "--img-size", str(SIZE), "--workers", "0"], "json"),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_argument_refuses_bad_files_in_one_line(files, kind, capsys):
    failures = []
    for script, argv, expected in _cases(files):
        bad = files["foreign"][expected] if kind == "foreign" else str(files["bad"][kind])
        args = [a.replace("{BAD}", bad) for a in argv]
        try:
            line = one_line_error(script, args, capsys)
        except (AssertionError, Exception) as exc:  # noqa: BLE001 - collect every script's failure, report all
            failures.append(f"{script.__name__} {argv[argv.index('{BAD}') - 1]} ({kind}): {type(exc).__name__}: "
                            f"{str(exc)[:300]}")
            continue
        if len(line) > 400:
            failures.append(f"{script.__name__} ({kind}): message too long: {line[:200]}...")
    assert not failures, "\n".join(failures)
    assert not (files["root"] / "out").exists() or not any(p.is_file() and p.suffix in (".pt", ".onnx", ".json")
                                                         for p in (files["root"] / "out").rglob("*"))


def test_empty_and_foreign_annotation_files_name_the_problem(files, tmp_path, capsys):
    bad = tmp_path / "no_images.json"
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    line = one_line_error(eval_coco, ["--weights", files["weights"], "--data", str(bad), "--images",
                                      files["images"], "--img-size", str(SIZE), "--workers", "0"], capsys)
    assert "no images" in line or "lists no images" in line


def test_every_output_location_that_cannot_be_written_is_one_line(files, tmp_path, capsys):
    """Outputs under a folder that cannot be made (/proc refuses new folders, even to root), and existing outputs
    without --overwrite."""
    blocked = "/proc/forbidden/out"
    common = ["--img-size", str(SIZE), "--batch-size", "4", "--workers", "0", "--no-progress"]
    cases = [
        (eval_coco, ["--weights", files["weights"], "--data", files["json"], "--images", files["images"], *common,
                     "--results", blocked + "/r.json"]),
        (eval_coco, ["--weights", files["weights"], "--data", files["json"], "--images", files["images"], *common,
                     "--save-json", blocked + "/p.json"]),
        (export_onnx, ["--weights", files["weights"], "--img-size", str(SIZE), "--output", blocked + "/m.onnx"]),
        (sensitivity_analyse, ["--weights", files["weights"], "--calib-weights", files["calib"], "--data-root",
                               files["images"], "--output", blocked, *common, "--proxy-images", "4", "--layers",
                               "detect.cls_preds.0"]),
        (partial_quant, ["--weights", files["weights"], "--calib-weights", files["calib"], "--sensitivity-file",
                         files["ranking"], "--skip-layers", "1", "--output-dir", blocked, "--no-export", *common]),
        (train, ["--qat", "--weights", files["calib"], "--images", files["images"], "--output-dir", blocked,
                 "--epochs", "1", "--img-size", str(SIZE), "--workers", "0", "--no-progress", "--max-images", "4"]),
    ]
    failures = []
    for script, argv in cases:
        try:
            line = one_line_error(script, argv, capsys)
            assert "/proc/forbidden" in line, line
        except (AssertionError, Exception) as exc:  # noqa: BLE001 - report every script at once
            failures.append(f"{script.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)
    existing = tmp_path / "exists.onnx"
    existing.write_text("keep me")
    line = one_line_error(export_onnx, ["--weights", files["weights"], "--img-size", str(SIZE), "--output",
                                        str(existing)], capsys)
    assert "--overwrite" in line and existing.read_text() == "keep me"
