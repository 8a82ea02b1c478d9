"""Deterministic synthetic COCO-format detection dataset (coloured shapes on textured backgrounds, real image files).

Layout written under out_dir:
    images/train/train_000000.jpg ...   images/val/val_000000.jpg ...
    annotations/instances_train.json    annotations/instances_val.json

Every image is drawn from its own generator seeded with (seed, split, index), so the same seed gives byte-identical
files and the first N images do not depend on how many are generated.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from utils.errors import InputError

_logger = logging.getLogger(__name__)

cv2.setNumThreads(0)  # sequential OpenCV: its thread pool would not survive the fork of later DataLoader workers

# Non-contiguous on purpose, like COCO's 1..90, so the category id <-> class index mapping is exercised.
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "star", "supercategory": "shape"},
    {"id": 18, "name": "cross", "supercategory": "shape"},
    {"id": 25, "name": "ring", "supercategory": "shape"},
]
# Base BGR colour per class; often replaced by a random colour so that shape, not colour, identifies the class.
_BASE_COLORS = [(40, 40, 220), (220, 80, 40), (40, 200, 40), (30, 210, 230), (200, 40, 200), (210, 200, 40)]

_SPLIT_IDS = {"train": 0, "val": 1}
_JPEG_QUALITY = 90
_MAX_OBJECTS = 8
_MIN_VISIBLE = 0.6  # an object keeps at least this fraction of its pixels visible when later ones overlap it
_PLACEMENT_TRIES = 6
_MIN_OBJECT_PX = 12
_MAX_OBJECT_FRAC = 0.45
# Index-based roles (i % 20) guarantee a few of each special case in any set of 20+ images.
_ROLE_EMPTY, _ROLE_GRAY, _ROLE_PNG = 3, 7, 13
_SHAPE_DRAW_SHIFT = 4  # fixed-point bits for cv2.fillPoly: sub-pixel vertex precision


def _image_shape(rng: np.random.Generator, img_size: int) -> tuple[int, int]:
    """Mostly square; some landscape / portrait at 4:5 so letterbox padding is exercised."""
    short = int(round(img_size * 0.8))
    kind = rng.random()
    if kind < 0.15:
        return short, img_size
    if kind < 0.30:
        return img_size, short
    return img_size, img_size


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise (float32 sampling is several times faster than rng.normal's float64)."""
    return rng.standard_normal(shape, dtype=np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random textured BGR background: noise, gradient, stripes, checker or blurred blobs."""
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    c2 = rng.integers(0, 256, 3).astype(np.float32)
    kind = rng.integers(0, 5)
    # Broadcast 1-D coordinates instead of full grids: the background is the generator's hot spot.
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:  # coloured noise, slightly blurred
        img = c1 + 35 * _noise(rng, (h, w, 3))
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 2.0)))
    elif kind == 1:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
        img = c1 * (1 - t) + c2 * t
    elif kind == 2:  # soft stripes at a random angle and period
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 40)
        t = (0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period))[..., None]
        img = c1 * (1 - t) + c2 * t
    elif kind == 3:  # checkerboard, low-ish contrast
        cell = int(rng.integers(8, 48))
        t = (((xx // cell) + (yy // cell)) % 2)[..., None]
        img = c1 * (1 - 0.6 * t) + c2 * 0.6 * t
    else:  # blurred blobs: upscaled low-resolution noise
        small = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.broadcast_to(img, (h, w, 3)) + 6 * _noise(rng, (h, w, 1))  # luminance grain
    return np.clip(img, 0, 255).astype(np.uint8)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _ellipse(a: float, b: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([a * np.cos(t), b * np.sin(t)], axis=1)


def _shape_polygons(rng: np.random.Generator, cls: int, size: float) -> list[tuple[np.ndarray, int]]:
    """Polygons (centred at 0, rotated) with fill values 1/0 that make up shape `cls` of extent ~size."""
    r = size / 2
    angle = rng.uniform(0, 2 * np.pi)
    name = CATEGORIES[cls]["name"]
    if name == "circle":
        polys = [(_ellipse(r, r * rng.uniform(0.85, 1.0)), 1)]
    elif name == "square":
        hy = r * rng.uniform(0.85, 1.0)
        polys = [(np.array([[-r, -hy], [r, -hy], [r, hy], [-r, hy]]) * 0.75, 1)]
    elif name == "triangle":
        t = np.deg2rad([90, 210, 330]) + rng.uniform(-0.15, 0.15, 3)
        radii = r * rng.uniform(0.9, 1.1, 3)
        polys = [(np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1), 1)]
    elif name == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        polys = [(np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1), 1)]
    elif name == "cross":
        th = r * rng.uniform(0.28, 0.38)
        pts = [[-th, -r], [th, -r], [th, -th], [r, -th], [r, th], [th, th],
               [th, r], [-th, r], [-th, th], [-r, th], [-r, -th], [-th, -th]]
        polys = [(np.array(pts, dtype=np.float64), 1)]
    else:  # ring: thick elliptical outline
        b = r * rng.uniform(0.7, 1.0)
        inner = rng.uniform(0.5, 0.7)
        polys = [(_ellipse(r, b), 1), (_ellipse(r * inner, b * inner), 0)]
    return [(_rotate(p, angle), v) for p, v in polys]


def _rasterize(polys: list[tuple[np.ndarray, int]], cx: float, cy: float, h: int, w: int):
    """Draw polygons centred at (cx, cy) into a patch clipped to the image; returns (mask, x0, y0) or None."""
    all_pts = np.concatenate([p for p, _ in polys]) + (cx, cy)
    x0, y0 = max(int(np.floor(all_pts[:, 0].min())), 0), max(int(np.floor(all_pts[:, 1].min())), 0)
    x1, y1 = min(int(np.ceil(all_pts[:, 0].max())) + 1, w), min(int(np.ceil(all_pts[:, 1].max())) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    scale = 1 << _SHAPE_DRAW_SHIFT
    for pts, value in polys:
        local = np.round((pts + (cx - x0, cy - y0)) * scale).astype(np.int32)
        cv2.fillPoly(mask, [local], int(value), lineType=cv2.LINE_8, shift=_SHAPE_DRAW_SHIFT)
    return mask.astype(bool), x0, y0


def _object_color(rng: np.random.Generator, cls: int, bg_mean: np.ndarray) -> np.ndarray:
    if rng.random() < 0.5:
        color = np.array(_BASE_COLORS[cls], np.float32) + rng.normal(0, 25, 3)
    else:
        color = rng.integers(0, 256, 3).astype(np.float32)
    # Keep the object distinguishable from the background it sits on.
    if np.abs(color - bg_mean).sum() < 120:
        color = (color + 128) % 256
    return np.clip(color, 0, 255)


def _paint(img: np.ndarray, rng: np.random.Generator, mask: np.ndarray, x0: int, y0: int, cls: int) -> None:
    """Fill the mask area with a shaded, slightly noisy object colour (in place)."""
    ph, pw = mask.shape
    patch = img[y0:y0 + ph, x0:x0 + pw]
    color = _object_color(rng, cls, patch[mask].mean(axis=0))
    ys, xs = np.nonzero(mask)
    # Linear shading across the object plus a little noise so it is not a flat colour.
    shade = (xs / pw - 0.5) * rng.uniform(-50, 50) + (ys / ph - 0.5) * rng.uniform(-50, 50)
    fill = color.astype(np.float32) + shade[:, None].astype(np.float32) + 5 * _noise(rng, (len(xs), 3))
    patch[ys, xs] = np.clip(fill, 0, 255).astype(np.uint8)


def _place_objects(img: np.ndarray, rng: np.random.Generator, n_objects: int) -> list[tuple[int, list[float], int]]:
    """Draw up to n_objects shapes with bounded occlusion; returns [(class_index, [x, y, w, h], area)]."""
    h, w = img.shape[:2]
    owner = np.zeros((h, w), np.int16)  # index+1 of the object whose pixels are on top, 0 = background
    areas: list[int] = []
    visible: list[int] = []  # pixels of each object still on top
    objects: list[tuple[int, list[float], int]] = []
    max_size = _MAX_OBJECT_FRAC * min(h, w)
    for _ in range(n_objects):
        for _try in range(_PLACEMENT_TRIES):
            cls = int(rng.integers(0, len(CATEGORIES)))
            size = float(np.exp(rng.uniform(np.log(_MIN_OBJECT_PX), np.log(max_size))))
            # Centre may sit a little outside the inner area so some shapes are cut by the border (boxes clipped).
            cx, cy = rng.uniform(size * 0.3, w - size * 0.3), rng.uniform(size * 0.3, h - size * 0.3)
            drawn = _rasterize(_shape_polygons(rng, cls, size), cx, cy, h, w)
            if drawn is None:
                continue
            mask, x0, y0 = drawn
            area = int(mask.sum())
            if area < 40:
                continue
            region = owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
            covered = np.bincount(region[mask], minlength=len(areas) + 1)[1:]
            remaining = np.array(visible, dtype=np.int64) - covered
            if np.any(remaining < _MIN_VISIBLE * np.array(areas, dtype=np.float64)):
                continue
            _paint(img, rng, mask, x0, y0, cls)
            region[mask] = len(areas) + 1
            visible = remaining.tolist() + [area]
            areas.append(area)
            ys, xs = np.nonzero(mask)
            # Tight box in COCO's continuous pixel coordinates: pixel column i spans [i, i+1).
            bx, by = float(x0 + xs.min()), float(y0 + ys.min())
            bbox = [bx, by, float(x0 + xs.max() + 1) - bx, float(y0 + ys.max() + 1) - by]
            objects.append((cls, bbox, area))
            break
    return objects


def _encode(img: np.ndarray, gray: bool, png: bool) -> bytes:
    if gray:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if png:
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]
    else:
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {ext} image")
    return buf.tobytes()


def _make_image(seed: int, split: str, index: int, img_size: int) -> tuple[bytes, str, int, int, list]:
    """Draw image `index` of `split`; returns (encoded bytes, extension, height, width, objects)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    role = index % 20
    h, w = _image_shape(rng, img_size)
    img = _background(rng, h, w)
    n_objects = 0 if role == _ROLE_EMPTY else int(rng.integers(1, _MAX_OBJECTS + 1))
    objects = _place_objects(img, rng, n_objects)
    if rng.random() < 0.3:  # mild defocus on some images
        img = cv2.GaussianBlur(img, (3, 3), 0)
    png = role == _ROLE_PNG
    return _encode(img, gray=role == _ROLE_GRAY, png=png), ".png" if png else ".jpg", h, w, objects


def _write_split(out_dir: Path, split: str, count: int, img_size: int, seed: int) -> dict[str, Any]:
    img_dir = out_dir / "images" / split
    ann_file = out_dir / "annotations" / f"instances_{split}.json"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, written = [], [], set()
    for i in range(count):
        data, ext, h, w, objects = _make_image(seed, split, i, img_size)
        file_name = f"{split}_{i:06d}{ext}"
        (img_dir / file_name).write_bytes(data)
        written.add(file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for cls, bbox, area in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORIES[cls]["id"],
                "bbox": bbox, "area": float(area), "iscrowd": 0, "segmentation": [],
            })
    _remove_stale(img_dir, split, written)
    coco = {
        "info": {"description": f"synthetic shapes, split={split}, seed={seed}", "version": "1.0", "year": 2025},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    ann_file.write_text(json.dumps(coco, separators=(",", ":")) + "\n", encoding="utf-8")
    return {"images": len(images), "annotations": len(annotations), "img_dir": str(img_dir), "ann_file": str(ann_file)}


def _remove_stale(img_dir: Path, split: str, keep: set[str]) -> None:
    """Delete images of an earlier, larger run (only files named like ours) so the folder matches the JSON."""
    pattern = re.compile(rf"{split}_\d{{6}}\.(jpg|png)")
    for path in img_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def generate_synthetic_coco(out_dir: str | Path, num_train: int, num_val: int, img_size: int = 320,
                            seed: int = 0) -> dict[str, Any]:
    """Write a synthetic COCO-format dataset under out_dir (overwriting earlier output) and return a summary dict.

    The summary holds 'out_dir', 'categories' and, per split ('train', 'val'), its 'images' and 'annotations' counts
    plus its 'img_dir' and 'ann_file' paths.
    """
    for name, value in (("number of train images", num_train), ("number of val images", num_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be an integer >= 0, got {value!r}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 64:
        raise InputError(f"image size must be an integer >= 64, got {img_size!r}: e.g. use 320")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    out_dir = Path(out_dir)
    try:
        (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out_dir} ({exc}): pass a writable --out folder") from exc
    summary: dict[str, Any] = {"out_dir": str(out_dir), "categories": [dict(c) for c in CATEGORIES]}
    for split, count in (("train", num_train), ("val", num_val)):
        summary[split] = _write_split(out_dir, split, count, img_size, seed)
        _logger.info("wrote %d %s images with %d annotations to %s", summary[split]["images"], split,
                     summary[split]["annotations"], summary[split]["img_dir"])
    return summary


def ensure_synthetic_coco(out_dir: str | Path, num_train: int, num_val: int, img_size: int = 320,
                          seed: int = 0) -> dict[str, Any]:
    """``generate_synthetic_coco``'s set, generated once: reused while ``out_dir/synthetic.json`` records the same
    settings (the generator is deterministic), so scripts can default to it without a separate set-up step."""
    out_dir = Path(out_dir)
    record = out_dir / "synthetic.json"
    settings = {"num_train": num_train, "num_val": num_val, "img_size": img_size, "seed": seed}
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("settings") == settings and all(
            Path(saved["summary"][split]["ann_file"]).is_file() for split in ("train", "val")):
        return saved["summary"]
    summary = generate_synthetic_coco(out_dir, num_train, num_val, img_size, seed)
    record.write_text(json.dumps({"settings": settings, "summary": summary}, indent=1) + "\n", encoding="utf-8")
    return summary
