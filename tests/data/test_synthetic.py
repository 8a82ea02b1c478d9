"""Tests for utils/data/synthetic.py and tools/make_synthetic_coco.py."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from pycocotools.coco import COCO

from tests.helpers import load_script
from utils.data.coco import CocoDetection
from utils.data.synthetic import generate_synthetic_coco
from utils.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "make_synthetic_coco.py"


def _load_script():
    return load_script("tools/make_synthetic_coco.py")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate_synthetic_coco(out, num_train=20, num_val=8, img_size=320, seed=0)


def test_same_seed_gives_identical_files(synth, tmp_path):
    out, summary = synth
    generate_synthetic_coco(tmp_path / "again", num_train=20, num_val=8, img_size=320, seed=0)
    first, second = _files(out), _files(tmp_path / "again")
    assert len(first) == 20 + 8 + 2
    assert first == second
    assert summary["train"]["images"] == 20 and summary["val"]["images"] == 8


def test_other_seed_differs_and_splits_differ(synth, tmp_path):
    out, _ = synth
    generate_synthetic_coco(tmp_path / "s1", num_train=20, num_val=8, img_size=320, seed=1)
    ann = "annotations/instances_train.json"
    assert (out / ann).read_bytes() != (tmp_path / "s1" / ann).read_bytes()
    train0 = (out / "images/train/train_000000.jpg").read_bytes()
    val0 = (out / "images/val/val_000000.jpg").read_bytes()
    assert train0 != val0


def test_json_is_valid_coco(synth):
    out, summary = synth
    data = json.loads(Path(summary["train"]["ann_file"]).read_text())
    assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
    cat_ids = [c["id"] for c in data["categories"]]
    assert len(cat_ids) == 6 and cat_ids != list(range(cat_ids[0], cat_ids[0] + 6))  # non-contiguous
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        im = images[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] and y + h <= im["height"]
        assert ann["iscrowd"] == 0 and ann["category_id"] in cat_ids and ann["area"] > 0
    per_image = {i: 0 for i in images}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
    assert 0 in per_image.values()  # image index 3 of every 20 is empty by construction
    assert max(per_image.values()) <= 8
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(summary["train"]["ann_file"])
    assert len(coco.imgs) == 20 and sorted(coco.cats) == sorted(cat_ids)


def test_image_files_match_json(synth):
    out, summary = synth
    data = json.loads(Path(summary["train"]["ann_file"]).read_text())
    names = [im["file_name"] for im in data["images"]]
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".jpg") for n in names)
    grayscale = 0
    for im in data["images"]:
        raw = cv2.imread(str(out / "images/train" / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert raw.shape[:2] == (im["height"], im["width"])
        grayscale += raw.ndim == 2
    assert grayscale >= 1
    assert {(im["width"], im["height"]) for im in data["images"]} > {(320, 320)}  # some non-square sizes


def test_coco_dataset_loads_synthetic(synth):
    _, summary = synth
    ds = CocoDetection(summary["val"]["ann_file"], summary["val"]["img_dir"], img_size=320)
    assert len(ds) == 8 and ds.cat_ids == [c["id"] for c in summary["categories"]]
    for i in range(len(ds)):
        item = ds[i]
        assert item["ok"] and item["image"].shape == (3, 320, 320)
        t = item["targets"]
        assert ((t[:, 1:] >= 0) & (t[:, 1:] <= 320)).all()


def test_regenerating_smaller_removes_stale_images(tmp_path):
    generate_synthetic_coco(tmp_path, num_train=6, num_val=0, img_size=64)
    generate_synthetic_coco(tmp_path, num_train=3, num_val=0, img_size=64)
    assert sorted(p.name for p in (tmp_path / "images/train").iterdir()) == [f"train_{i:06d}.jpg" for i in range(3)]


def test_generator_input_errors(tmp_path):
    with pytest.raises(InputError):
        generate_synthetic_coco(tmp_path, num_train=-1, num_val=0)
    with pytest.raises(InputError):
        generate_synthetic_coco(tmp_path, num_train=1, num_val=0, img_size=16)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create"):
        generate_synthetic_coco(blocker, num_train=1, num_val=0)


# ---------------------------------------------------------------- script


def test_script_parser_and_main(tmp_path, capsys):
    script = _load_script()
    args = script.get_args_parser().parse_args(["--out", str(tmp_path), "--train", "3", "--val", "2", "--seed", "5"])
    assert (args.train, args.val, args.img_size, args.seed) == (3, 2, 320, 5)
    defaults = script.get_args_parser().parse_args(["--out", "x"])
    assert (defaults.train, defaults.val, defaults.img_size, defaults.seed) == (200, 50, 320, 0)
    summary = script.main(args)
    assert summary["train"]["images"] == 3 and summary["val"]["images"] == 2 and summary["seconds"] >= 0
    assert "3 train / 2 val" in capsys.readouterr().out


def test_script_rejects_bad_img_size():
    parser = _load_script().get_args_parser()
    with pytest.raises(SystemExit) as excinfo:
        parser.parse_args(["--out", "x", "--img-size", "300"])
    assert excinfo.value.code == 2


def test_script_runs_from_repo_root(tmp_path):
    ok = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "d"), "--train", "2", "--val", "1"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "d/annotations/instances_val.json").is_file()
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    bad = subprocess.run([sys.executable, str(SCRIPT), "--out", str(blocker), "--train", "1", "--val", "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
