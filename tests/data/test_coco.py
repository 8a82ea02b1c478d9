"""Tests for utils/data/coco.py: letterbox geometry, box mapping, COCO annotation loading, COCO / folder datasets
and batching."""

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.data.coco import (
    CocoDetection,
    ImageFolderDataset,
    check_img_size,
    collate_detection,
    create_dataloader,
    letterbox,
    load_coco,
    read_image_rgb,
    rect_canvases,
    resize_long_side,
    scale_boxes_to_original,
)
from utils.errors import InputError

S = 320


# ---------------------------------------------------------------- letterbox / box mapping


def test_letterbox_wide_image_pads_top_and_bottom():
    img = np.full((100, 200, 3), 10, np.uint8)  # h=100, w=200
    out, ratio, pad = letterbox(img, S)
    assert out.shape == (S, S, 3)
    assert ratio == pytest.approx(1.6)
    assert pad == (0.0, 80.0)
    assert (out[:80] == 114).all() and (out[240:] == 114).all()
    assert (out[80:240] == 10).all()


def test_letterbox_tall_image_splits_odd_padding_like_yolov6():
    img = np.full((300, 100, 3), 200, np.uint8)  # h=300, w=100 -> resized width round(106.67) = 107
    out, ratio, pad = letterbox(img, S)
    assert out.shape == (S, S, 3)
    assert ratio == pytest.approx(320 / 300)
    assert pad == (pytest.approx(106.5), 0.0)
    # Odd padding 213: 106 columns left, 107 right.
    assert (out[:, :106] == 114).all() and (out[:, 213:] == 114).all()
    assert (out[:, 106:213] == 200).all()


def test_letterbox_upscales_small_images():
    out, ratio, pad = letterbox(np.zeros((32, 64, 3), np.uint8), S)
    assert out.shape == (S, S, 3) and ratio == pytest.approx(5.0) and pad == (0.0, 80.0)


def test_scale_boxes_round_trip_is_exact():
    ratio, pad = 1.6, (0.0, 80.0)  # the 200x100 -> 320 case above
    original = torch.tensor([[20.0, 10.0, 120.0, 60.0]])
    forward = torch.tensor([[32.0, 96.0, 192.0, 176.0]])  # x * 1.6, y * 1.6 + 80, by hand
    back = scale_boxes_to_original(forward, ratio, pad, (100, 200))
    assert torch.allclose(back, original, atol=1e-4)
    assert back is not forward and torch.equal(forward, torch.tensor([[32.0, 96.0, 192.0, 176.0]]))


def test_scale_boxes_half_pixel_pad_and_clipping():
    ratio, pad = 320 / 300, (106.5, 0.0)
    original = torch.tensor([[10.0, 30.0, 60.0, 90.0]])
    forward = original.clone()
    forward[:, [0, 2]] = forward[:, [0, 2]] * ratio + 106.5
    forward[:, [1, 3]] = forward[:, [1, 3]] * ratio
    assert torch.allclose(scale_boxes_to_original(forward, ratio, pad, (300, 100)), original, atol=1e-4)
    # Boxes reaching into the padding are clipped to the original image.
    clipped = scale_boxes_to_original(torch.tensor([[0.0, -5.0, 319.0, 330.0]]), ratio, pad, (300, 100))
    assert clipped.tolist() == [[0.0, 0.0, 100.0, 300.0]]


def test_check_img_size():
    assert check_img_size(320) == 320
    with pytest.raises(InputError, match="try 320"):
        check_img_size(300)
    with pytest.raises(InputError):
        check_img_size(0)
    with pytest.raises(InputError):
        check_img_size(-64)


# ---------------------------------------------------------------- a tiny COCO dataset written by the test


def _write(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())


@pytest.fixture()
def tiny_coco(tmp_path):
    """3 images (colour jpg 200x100, grayscale jpg 100x300, colour png 64x64 without boxes); categories 1 and 90."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    _write(img_dir / "a.jpg", np.full((100, 200, 3), (0, 0, 255), np.uint8))  # BGR red
    _write(img_dir / "gray.jpg", np.full((300, 100), 90, np.uint8))
    _write(img_dir / "c.png", np.full((64, 64, 3), 30, np.uint8))
    coco = {
        "images": [  # ids deliberately unsorted
            {"id": 7, "file_name": "gray.jpg", "width": 100, "height": 300},
            {"id": 3, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 11, "file_name": "c.png", "width": 64, "height": 64},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 1, "bbox": [20, 10, 100, 50], "area": 5000, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 90, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 90, "bbox": [10, 30, 50, 60], "area": 3000, "iscrowd": 0},
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file, img_dir


def test_coco_dataset_mapping_and_order(tiny_coco):
    ds = CocoDetection(*tiny_coco, img_size=S)
    assert len(ds) == 3
    assert ds.cat_ids == [1, 90]
    assert ds.cat_id_to_index == {1: 0, 90: 1}
    assert ds.class_names == ["person", "toothbrush"]
    assert ds.image_ids == [3, 7, 11]
    assert len(CocoDetection(*tiny_coco, img_size=S, max_images=2)) == 2


def test_coco_item_targets_in_letterboxed_pixels(tiny_coco):
    ds = CocoDetection(*tiny_coco, img_size=S)
    item = ds[0]
    assert item["image_id"] == 3 and item["ok"] is True
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert item["orig_hw"] == (100, 200) and item["ratio"] == pytest.approx((1.6, 1.6)) and item["pad"] == (0, 80)
    # Only the non-crowd box with positive size survives: (class 0, 20*1.6, 10*1.6+80, 120*1.6, 60*1.6+80).
    assert item["targets"].dtype == torch.float32
    assert torch.allclose(item["targets"], torch.tensor([[0.0, 32.0, 96.0, 192.0, 176.0]]), atol=1e-4)
    # RGB order: the BGR-red image has a high R channel.
    centre = item["image"][:, 160, 160]
    assert centre[0] > 0.9 and centre[2] < 0.1


def test_coco_grayscale_and_png(tiny_coco):
    ds = CocoDetection(*tiny_coco, img_size=S)
    gray = ds[1]
    assert gray["ok"] and gray["image"].shape == (3, S, S) and gray["orig_hw"] == (300, 100)
    assert torch.equal(gray["image"][0], gray["image"][1]) and torch.equal(gray["image"][1], gray["image"][2])
    # YOLOv6's square (rect off): 300x100 -> 320x106 (whole pixels), left pad round((320 - 106) / 2 - 0.1) = 107
    r, rx = 320 / 300, 1.06
    expected = torch.tensor([[1.0, 10 * rx + 107, 30 * r, 60 * rx + 107, 90 * r]])
    assert torch.allclose(gray["targets"], expected, atol=1e-4)
    png = ds[2]
    assert png["ok"] and png["targets"].shape == (0, 5) and png["path"].endswith("c.png")


def test_collate_and_dataloader(tiny_coco):
    ds = CocoDetection(*tiny_coco, img_size=S)
    batch = collate_detection([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 3, S, S)
    assert batch["targets"].shape == (2, 6)
    assert batch["targets"][:, 0].tolist() == [0.0, 1.0]
    assert batch["image_id"] == [3, 7, 11] and batch["ok"] == [True, True, True]
    loader = create_dataloader(ds, batch_size=2, workers=0)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    assert torch.equal(batches[0]["targets"], batch["targets"])


def test_unreadable_image_is_flagged_not_raised(tiny_coco, caplog):
    ann_file, img_dir = tiny_coco
    (img_dir / "a.jpg").write_bytes(b"this is not a jpeg" * 10)
    ds = CocoDetection(ann_file, img_dir, img_size=S)
    with caplog.at_level(logging.WARNING, logger="utils.data.coco"):
        item = ds[0]
    assert item["ok"] is False
    assert torch.count_nonzero(item["image"]) == 0
    assert "a.jpg" in caplog.text
    # Geometry falls back to the JSON size, so the targets are still where they would be.
    assert item["orig_hw"] == (100, 200) and item["targets"].shape == (1, 5)
    assert read_image_rgb(img_dir / "a.jpg") is None
    assert read_image_rgb(img_dir / "does_not_exist.jpg") is None


def test_coco_input_errors(tiny_coco, tmp_path):
    ann_file, img_dir = tiny_coco
    with pytest.raises(InputError, match="not found"):
        CocoDetection(tmp_path / "missing.json", img_dir)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a COCO annotation JSON"):
        CocoDetection(bad, img_dir)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(InputError, match="images"):
        CocoDetection(bad, img_dir)
    with pytest.raises(InputError, match="image folder not found"):
        CocoDetection(ann_file, tmp_path / "no_such_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        CocoDetection(ann_file, empty)
    with pytest.raises(InputError):
        CocoDetection(ann_file, img_dir, img_size=300)


# ---------------------------------------------------------------- image folder


def test_image_folder_dataset(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "b.png", np.zeros((40, 80, 3), np.uint8))
    _write(tmp_path / "sub" / "a.JPG", np.zeros((80, 40, 3), np.uint8))
    _write(tmp_path / "a.jpg", np.zeros((64, 64), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, img_size=S)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == ["a.jpg", "b.png", "sub/a.JPG"]
    item = ds[2]
    assert item["image_id"] == 2 and item["ok"] and item["image"].shape == (3, S, S)
    assert item["orig_hw"] == (80, 40) and item["targets"].shape == (0, 5)
    assert len(ImageFolderDataset(tmp_path, img_size=S, max_images=1)) == 1
    batch = collate_detection([ds[0], ds[1]])
    assert batch["targets"].shape == (0, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images"):
        ImageFolderDataset(tmp_path)


def test_image_folder_unreadable_file(tmp_path, caplog):
    (tmp_path / "broken.jpg").write_bytes(b"\x00" * 100)
    ds = ImageFolderDataset(tmp_path, img_size=S)
    with caplog.at_level(logging.WARNING, logger="utils.data.coco"):
        item = ds[0]
    assert item["ok"] is False and "broken.jpg" in caplog.text
    assert item["image"].shape == (3, S, S)


def test_load_coco_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="not found"):
        load_coco(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"images": [')
    with pytest.raises(InputError, match="is not a COCO annotation JSON: .*; pass the instances_"):
        load_coco(corrupt)
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[1, 2]")
    with pytest.raises(InputError, match="is not a COCO annotation JSON: top level is a list"):
        load_coco(not_coco)
    no_annotations = tmp_path / "no_ann.json"
    no_annotations.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(InputError, match="missing list 'annotations'"):
        load_coco(no_annotations)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------- YOLOv6's rect geometry
def test_rect_canvases_are_yolov6s_batch_shapes():
    # (h, w): aspect ratios w/h 2, 1, 1/3; one image per group -> each canvas from its own ratio, by hand:
    # ceil(ratio_scale * 320 / 32 + 0.5) * 32 per axis, the long axis ceil(10.5) * 32 = 352
    groups, canvases = rect_canvases([(100, 200), (64, 64), (300, 100)], 320, 32, group=1)
    assert groups == [[2], [1], [0]]  # ordered by w / h
    assert canvases == [(192, 352), (352, 352), (352, 128)]
    # one group of all three: the ratios straddle 1, so the square canvas with its half-stride margin
    groups, canvases = rect_canvases([(100, 200), (64, 64), (300, 100)], 320, 32)
    assert groups == [[2, 1, 0]] and canvases == [(352, 352)] * 3


def test_resize_long_side_truncates_and_shrinks_by_area():
    img = np.arange(300 * 100 * 3, dtype=np.uint8).reshape(300, 100, 3)
    out = resize_long_side(img, 150)  # ratio 0.5: INTER_AREA, int(100 * 0.5) x int(300 * 0.5)
    assert out.shape == (150, 50, 3)
    assert np.array_equal(out, cv2.resize(img, (50, 150), interpolation=cv2.INTER_AREA))
    assert resize_long_side(img, 320).shape == (320, 106, 3)  # 100 * 320 / 300 = 106.67 -> 106


def test_rect_items_and_batches(tiny_coco):
    ds = CocoDetection(*tiny_coco, img_size=320, letterbox="rect", stride=32)
    assert ds.image_ids == [3, 7, 11] and ds.batches(2) == [[1, 2], [0]]  # gray (w/h 1/3), c (1), a (2)
    a, gray = ds[0], ds[1]
    assert a["image"].shape == (3, 352, 352) and gray["image"].shape == (3, 352, 352)
    # a.jpg 100x200 -> 160x320, centred: left (352 - 320) / 2 = 16, top (352 - 160) / 2 = 96
    assert a["ratio"] == (1.6, 1.6) and a["pad"] == (16, 96)
    assert torch.allclose(a["targets"], torch.tensor([[0.0, 48.0, 112.0, 208.0, 192.0]]), atol=1e-4)
    # gray.jpg 300x100 -> 320x106: its own scale on each axis (320 / 300 and 106 / 100), left 123, top 16
    assert gray["ratio"] == pytest.approx((320 / 300, 1.06)) and gray["pad"] == (123, 16)
    expected = [1.0, 10 * 1.06 + 123, 30 * 320 / 300 + 16, 60 * 1.06 + 123, 90 * 320 / 300 + 16]
    assert torch.allclose(gray["targets"], torch.tensor([expected]), atol=1e-4)
    back = scale_boxes_to_original(gray["targets"][:, 1:], gray["ratio"], gray["pad"], gray["orig_hw"])
    assert torch.allclose(back, torch.tensor([[10.0, 30.0, 60.0, 90.0]]), atol=1e-4)
    shapes = [tuple(batch["image"].shape) for batch in create_dataloader(ds, 2, workers=0)]
    assert shapes == [(2, 3, 352, 352), (1, 3, 352, 352)]


def test_unknown_letterbox_is_refused(tiny_coco):
    with pytest.raises(InputError, match="--letterbox"):
        CocoDetection(*tiny_coco, img_size=320, letterbox="oval")
