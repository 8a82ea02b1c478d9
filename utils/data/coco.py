"""COCO-format data loading: letterbox pre-processing, box mapping, datasets and the detection collate function."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from utils.errors import InputError

# OpenCV's own thread pool does not survive fork(): once it has run in a process, DataLoader workers forked from it
# can hang in their first cv2 call. Sequential OpenCV (parallelism comes from the workers) avoids that.
cv2.setNumThreads(0)

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
PAD_VALUE = 114
LETTERBOXES = ("square", "rect")  # CocoDetection's image geometries (see its docstring)
RECT_GROUP = 32  # images per rectangular canvas: YOLOv6 tools/eval.py's batch, so the canvases are its own


_ANNOTATION_HINT = "pass the instances_*.json of your dataset"

LETTERBOX_HELP = (f"image geometry of the mAP: rect is YOLOv6's own evaluation (tools/eval.py: rectangular canvases "
                  f"per {RECT_GROUP} images of similar aspect ratio; the mAP YOLOv6 reports), square one img-size "
                  "canvas for every image (what a static-shape ONNX model or TensorRT engine takes)")


def add_letterbox_argument(parser: Any, default: str | None = "rect", extra_help: str = "") -> None:
    """``--letterbox rect|square``: the geometry of the mAP a script measures (rect, YOLOv6's, by default)."""
    parser.add_argument("--letterbox", choices=LETTERBOXES, default=default, help=LETTERBOX_HELP + extra_help)


def model_stride(model: Any) -> int:
    """The largest stride of a YOLOv6 model (rect canvases round up to it); 32 for anything that does not say."""
    return int(getattr(model, "max_stride", 32))


def load_coco(ann_file: str | os.PathLike[str]) -> COCO:
    """Load a COCO annotation file without pycocotools' prints; InputError when missing or not COCO JSON."""
    path = Path(ann_file)
    if not path.is_file():
        raise InputError(f"COCO annotation file {path} not found; {_ANNOTATION_HINT}")
    try:
        with path.open(encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a COCO annotation JSON: {exc}; {_ANNOTATION_HINT}") from exc
    problem = _dataset_problem(dataset)
    if problem:
        raise InputError(f"{path} is not a COCO annotation JSON: {problem}; {_ANNOTATION_HINT}")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a COCO annotation JSON: bad entry ({exc!r}); {_ANNOTATION_HINT}") from exc
    _logger.debug("loaded %s: %d images, %d annotations", path, len(coco.imgs), len(coco.anns))
    return coco


def _dataset_problem(dataset: Any) -> str | None:
    """Why `dataset` is not a usable COCO detection dataset, or None."""
    if not isinstance(dataset, dict):
        return f"top level is a {type(dataset).__name__}, expected an object"
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            return f"missing list '{key}'"
    return None


def _letterbox_geometry(h: int, w: int, new_size: int) -> tuple[float, int, int, float, float]:
    """Return (ratio, resized_w, resized_h, pad_x, pad_y) for fitting an h x w image into new_size x new_size."""
    ratio = new_size / max(h, w)
    # max(1, ...) keeps extremely thin images from collapsing to zero pixels.
    new_w = max(1, int(round(w * ratio)))
    new_h = max(1, int(round(h * ratio)))
    return ratio, new_w, new_h, (new_size - new_w) / 2, (new_size - new_h) / 2


def letterbox(
    img: np.ndarray, new_size: int = 640, color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE)
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize an HxWxC image so its long side is new_size and pad it to a centred new_size x new_size square.

    Returns (padded image, ratio, (pad_x, pad_y)); the pads are the half-paddings dw/2, dh/2 as floats, the convention
    YOLOv5/YOLOv6 use when mapping boxes back, so scale_boxes_to_original() is its exact inverse.
    """
    h, w = img.shape[:2]
    ratio, new_w, new_h, pad_x, pad_y = _letterbox_geometry(h, w, new_size)
    if (new_w, new_h) != (w, h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # The +-0.1 splits an odd padding as YOLOv5/YOLOv6 do: the extra pixel goes to the bottom/right.
    top, bottom = int(round(pad_y - 0.1)), int(round(pad_y + 0.1))
    left, right = int(round(pad_x - 0.1)), int(round(pad_x + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, ratio, (pad_x, pad_y)


def scale_boxes_to_original(
    boxes_xyxy: torch.Tensor, ratio: float | tuple[float, float], pad: tuple[float, float], orig_hw: tuple[int, int]
) -> torch.Tensor:
    """Map [..., 4] xyxy boxes from letterboxed to original image pixels and clip them to the image; returns a copy.
    ``ratio``: one scale, or (y, x) scales for an image resized to whole pixels on each axis (the rect geometry)."""
    ratio_y, ratio_x = ratio if isinstance(ratio, (tuple, list)) else (ratio, ratio)
    boxes = boxes_xyxy.clone() if boxes_xyxy.is_floating_point() else boxes_xyxy.float()
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., [0, 2]] /= ratio_x
    boxes[..., [1, 3]] /= ratio_y
    h, w = orig_hw
    boxes[..., [0, 2]] = boxes[..., [0, 2]].clamp(0, w)
    boxes[..., [1, 3]] = boxes[..., [1, 3]].clamp(0, h)
    return boxes


# ------------------------------------------------------------------------------------- YOLOv6's rect geometry
def resize_long_side(img: np.ndarray, img_size: int) -> np.ndarray:
    """The long side to ``img_size`` as YOLOv6's loader does it: sizes truncated to whole pixels, INTER_AREA when
    shrinking, INTER_LINEAR when enlarging."""
    h0, w0 = img.shape[:2]
    ratio = img_size / max(h0, w0)
    if ratio == 1:
        return img
    return cv2.resize(img, (int(w0 * ratio), int(h0 * ratio)),
                      interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)


def pad_to_canvas(img: np.ndarray, canvas_hw: tuple[int, int],
                  color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE)
                  ) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Centre ``img`` on a ``canvas_hw`` canvas, shrinking it first if it does not fit (never enlarging); returns
    (canvas, the shrink ratio, (left, top) whole-pixel padding), as YOLOv6's letterbox with auto and scaleup off."""
    h, w = img.shape[:2]
    ratio = min(canvas_hw[0] / h, canvas_hw[1] / w, 1.0)
    new_w, new_h = int(round(w * ratio)), int(round(h * ratio))
    if (new_w, new_h) != (w, h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (canvas_hw[1] - new_w) / 2, (canvas_hw[0] - new_h) / 2
    top, bottom = int(round(pad_y - 0.1)), int(round(pad_y + 0.1))
    left, right = int(round(pad_x - 0.1)), int(round(pad_x + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, ratio, (left, top)


def rect_canvases(sizes_hw: Sequence[tuple[int, int]], img_size: int, stride: int,
                  group: int = RECT_GROUP) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """YOLOv6's rectangular evaluation batches: images ordered by aspect ratio w/h (as given, then numpy's default
    sort, so ties fall as YOLOv6's fall), cut into groups of ``group``, each group's canvas the smallest that holds
    its extreme aspect ratio at ``img_size``, rounded up to the stride with half a stride of margin. Returns (the
    groups as lists of indices into ``sizes_hw``, each index's canvas (h, w))."""
    shapes = np.array(sizes_hw, dtype=np.float64).reshape(-1, 2)
    aspect = shapes[:, 1] / shapes[:, 0]
    order = aspect.argsort()
    groups = [order[i:i + group].tolist() for i in range(0, len(order), group)]
    canvases: list[tuple[int, int]] = [(img_size, img_size)] * len(shapes)
    for members in groups:
        lo, hi = aspect[members].min(), aspect[members].max()
        scale = [1, hi] if hi < 1 else [1 / lo, 1] if lo > 1 else [1, 1]
        h, w = (np.ceil(np.array(scale) * img_size / stride + 0.5).astype(np.int_) * stride).tolist()
        for i in members:
            canvases[i] = (int(h), int(w))
    return groups, canvases


def check_img_size(img_size: int, stride: int = 32) -> int:
    """Return img_size if it is a positive multiple of stride, else raise InputError suggesting a valid size."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % stride:
        suggestion = max(stride, math.ceil(img_size / stride) * stride) if isinstance(img_size, (int, float)) else 640
        raise InputError(f"--img-size must be a positive multiple of {stride}, got {img_size}: try {suggestion}")
    return img_size


def read_image_rgb(path: str | Path) -> np.ndarray | None:
    """Read an image file as an HxWx3 uint8 RGB array, or return None if it is missing or cannot be decoded.

    Grayscale becomes 3 channels, alpha is dropped and 16-bit images are scaled to 8 bits (cv2.IMREAD_COLOR).
    """
    try:
        # fromfile + imdecode instead of imread: works with non-ASCII paths and does not print on failure.
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    # Ignore EXIF orientation: COCO widths/heights and boxes refer to the stored pixel grid.
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> float32 [3,H,W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def _load_item(path: Path, img_size: int, fallback_hw: tuple[int, int] | None) -> dict[str, Any]:
    """Read and letterbox one image; unreadable files give a zero image, ok=False and a logged warning."""
    img = read_image_rgb(path)
    if img is None:
        _logger.warning("cannot read image %s: using a blank image and marking it ok=False", path)
        h, w = fallback_hw if fallback_hw else (0, 0)
        ratio, pad = 1.0, (0.0, 0.0)
        if h > 0 and w > 0:
            # Same geometry as a readable image would get, so targets stay consistent.
            ratio, _, _, pad_x, pad_y = _letterbox_geometry(h, w, img_size)
            pad = (pad_x, pad_y)
        image = torch.zeros(3, img_size, img_size, dtype=torch.float32)
        return {"image": image, "orig_hw": (h, w), "ratio": ratio, "pad": pad, "path": str(path), "ok": False}
    orig_hw = (int(img.shape[0]), int(img.shape[1]))
    padded, ratio, pad = letterbox(img, img_size)
    return {"image": _to_tensor(padded), "orig_hw": orig_hw, "ratio": ratio, "pad": pad, "path": str(path), "ok": True}


def _load_on_canvas(path: Path, img_size: int, canvas_hw: tuple[int, int],
                    fallback_hw: tuple[int, int] | None) -> dict[str, Any]:
    """Read one image and place it on ``canvas_hw`` as YOLOv6's evaluation does (rect canvases, or img_size square:
    its evaluation with rect off); ``ratio`` is (y, x): each axis's whole-pixel size over its original."""
    img = read_image_rgb(path)
    if img is None:
        _logger.warning("cannot read image %s: using a blank image and marking it ok=False", path)
        image = torch.zeros(3, *canvas_hw, dtype=torch.float32)
        return {"image": image, "orig_hw": fallback_hw or (0, 0), "ratio": (1.0, 1.0), "pad": (0, 0),
                "path": str(path), "ok": False}
    h0, w0 = int(img.shape[0]), int(img.shape[1])
    resized = resize_long_side(img, img_size)
    padded, shrink, pad = pad_to_canvas(resized, canvas_hw)
    h, w = resized.shape[:2]
    return {"image": _to_tensor(padded), "orig_hw": (h0, w0), "ratio": (h * shrink / h0, w * shrink / w0),
            "pad": pad, "path": str(path), "ok": True}


def _check_image_dir(img_dir: Path) -> None:
    if not img_dir.is_dir():
        raise InputError(f"image folder not found: {img_dir}: pass the folder that holds the dataset's images")
    if not any(img_dir.iterdir()):
        raise InputError(f"image folder is empty: {img_dir}: pass the folder that holds the dataset's images")


def _load_annotations(ann_file: Path) -> COCO:
    """The annotation file as a pycocotools COCO, checked for what detection needs (images, categories, file names)."""
    coco = load_coco(ann_file)
    if not coco.dataset["images"]:
        raise InputError(f"annotation file {ann_file} lists no images: pass a COCO JSON that lists the images to use")
    if not coco.dataset["categories"]:
        raise InputError(f"annotation file {ann_file} has no categories: pass a COCO instances JSON file")
    for img in coco.dataset["images"]:
        if "file_name" not in img:
            raise InputError(f"annotation file {ann_file}: image {img.get('id')} has no 'file_name': fix it")
    return coco


def read_categories(ann_file: str | Path) -> tuple[list[int], list[str]]:
    """(category ids sorted, names in the same order) of a COCO annotation file: class index i <-> ids[i]."""
    cats = sorted(_load_annotations(Path(ann_file)).dataset["categories"], key=lambda c: c["id"])
    return [c["id"] for c in cats], [str(c.get("name", c["id"])) for c in cats]


def _check_max_images(max_images: int | None) -> None:
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise InputError(f"max_images must be a positive integer or None, got {max_images!r}: e.g. use 500")


class CocoDetection(Dataset):
    """COCO-format detection dataset yielding letterboxed RGB images with targets in letterboxed pixels.

    Images are read as YOLOv6's evaluation (tools/eval.py) reads them: long side to img_size (INTER_AREA when
    shrinking, whole pixels), then centred on a canvas. ``letterbox``: ``rect`` (YOLOv6's default; eval_coco.py's)
    gives each group of RECT_GROUP images of similar aspect ratio the smallest canvas that holds them
    (``rect_canvases``, with the model's largest ``stride``; load it in the groups ``batches()`` gives; every
    script's default, ``--letterbox``); ``square`` (this class's default) puts every image on one img_size x img_size
    canvas (YOLOv6's rect off; what a static-shape ONNX model or TensorRT engine takes).

    Attributes:
        coco: the pycocotools COCO object of the annotation file (ground truth for COCOeval).
        cat_ids: sorted category ids; class index i <-> cat_ids[i].
        cat_id_to_index: inverse of cat_ids.
        class_names: category names in class-index order.
        image_ids: ids of the images served, sorted, truncated to max_images.
    """

    def __init__(self, ann_file: str | Path, img_dir: str | Path, img_size: int = 640, max_images: int | None = None,
                 letterbox: str = "square", stride: int = 32):
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.img_size = check_img_size(img_size)
        _check_max_images(max_images)
        if letterbox not in LETTERBOXES:
            raise InputError(f"--letterbox must be one of {', '.join(LETTERBOXES)}, got {letterbox!r}")
        self.letterbox, self.stride = letterbox, stride
        self.coco = _load_annotations(self.ann_file)
        _check_image_dir(self.img_dir)

        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.cat_id_to_index: dict[int, int] = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in cats]

        self.image_ids: list[int] = sorted(self.coco.imgs)[:max_images]
        self._targets = {img_id: self._image_targets(img_id) for img_id in self.image_ids}
        self._check_files_exist()
        self._groups: list[list[int]] = []
        self._canvases: list[tuple[int, int]] = []
        if letterbox == "rect":
            self._place_on_rect_canvases(stride)

    def _place_on_rect_canvases(self, stride: int) -> None:
        # YOLOv6 orders its image paths by name before sorting them by aspect ratio; so do we, for the same ties.
        by_name = sorted(range(len(self.image_ids)), key=lambda i: self.coco.imgs[self.image_ids[i]]["file_name"])
        groups, canvases = rect_canvases([self._stored_hw(i) for i in by_name], self.img_size, stride)
        self._groups = [[by_name[k] for k in group] for group in groups]
        self._canvases = [(0, 0)] * len(self.image_ids)
        for k, canvas in enumerate(canvases):
            self._canvases[by_name[k]] = canvas

    def _stored_hw(self, index: int) -> tuple[int, int]:
        """(h, w) from the annotation file, or from the image when the file does not say."""
        info = self.coco.imgs[self.image_ids[index]]
        if info.get("height") and info.get("width"):
            return int(info["height"]), int(info["width"])
        img = read_image_rgb(self.image_path(index))
        return (int(img.shape[0]), int(img.shape[1])) if img is not None else (1, 1)

    def batches(self, batch_size: int) -> list[list[int]] | None:
        """The rect geometry's batches (each within one canvas group, up to ``batch_size``); None for square."""
        if self.letterbox != "rect":
            return None
        return [group[i:i + batch_size] for group in self._groups for i in range(0, len(group), batch_size)]

    def _image_targets(self, img_id: int) -> np.ndarray:
        """Non-crowd boxes with positive size as [n,5] (class_index, x1, y1, x2, y2) in original pixels."""
        info = self.coco.imgs[img_id]
        w, h = info.get("width"), info.get("height")
        rows = []
        for ann in self.coco.imgToAnns.get(img_id, []):
            bbox = ann.get("bbox")
            if ann.get("iscrowd", 0) or bbox is None or len(bbox) != 4:
                continue
            cls = self.cat_id_to_index.get(ann.get("category_id"))
            if cls is None:
                _logger.warning("annotation %s has unknown category_id %s: skipped",
                                ann.get("id"), ann.get("category_id"))
                continue
            x1, y1, bw, bh = (float(v) for v in bbox)
            x2, y2 = x1 + bw, y1 + bh
            if w and h:
                x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
                y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
            if x2 > x1 and y2 > y1:
                rows.append((cls, x1, y1, x2, y2))
        return np.array(rows, dtype=np.float32).reshape(-1, 5)

    def _check_files_exist(self) -> None:
        missing = [i for i in self.image_ids if not (self.img_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing and len(missing) == len(self.image_ids):
            raise InputError(
                f"none of the {len(missing)} images listed in {self.ann_file} are in {self.img_dir}: "
                "pass the image folder that matches the annotation file"
            )
        if missing:
            _logger.warning("%d of %d images listed in %s are missing from %s: they will be served with ok=False",
                            len(missing), len(self.image_ids), self.ann_file, self.img_dir)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.img_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def original_targets(self, index: int) -> np.ndarray:
        """[n,5] (class_index, x1, y1, x2, y2) in original image pixels (a copy)."""
        return self._targets[self.image_ids[index]].copy()

    def num_annotations(self) -> int:
        """Usable (non-crowd, non-empty) boxes over the served images."""
        return sum(len(t) for t in self._targets.values())

    def annotated_categories(self) -> list[int]:
        """Category ids with at least one usable box on the served images."""
        indices = {int(c) for t in self._targets.values() for c in t[:, 0]} if self._targets else set()
        return [self.cat_ids[i] for i in sorted(indices)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_id = self.image_ids[index]
        info = self.coco.imgs[img_id]
        json_hw = (int(info.get("height") or 0), int(info.get("width") or 0))
        path = self.img_dir / info["file_name"]
        canvas = self._canvases[index] if self.letterbox == "rect" else (self.img_size, self.img_size)
        item = _load_on_canvas(path, self.img_size, canvas, json_hw)
        if item["ok"] and all(json_hw) and item["orig_hw"] != json_hw:
            _logger.warning("image %s is %s but the annotation file says %s (h, w): boxes may be off",
                            item["path"], item["orig_hw"], json_hw)
        targets = torch.from_numpy(self._targets[img_id].copy())
        ratio_y, ratio_x = item["ratio"]
        targets[:, [1, 3]] *= ratio_x
        targets[:, [2, 4]] *= ratio_y
        targets[:, [1, 3]] += item["pad"][0]
        targets[:, [2, 4]] += item["pad"][1]
        item["image_id"] = int(img_id)
        item["targets"] = targets
        return item


class ImageFolderDataset(Dataset):
    """Images-only folder (searched recursively), e.g. for calibration; items match CocoDetection's, targets empty.

    Unreadable files are served with ok=False, a zero image, orig_hw (0, 0), ratio 1 and pad (0, 0).
    """

    def __init__(self, img_dir: str | Path, img_size: int = 640, max_images: int | None = None):
        self.img_dir = Path(img_dir)
        self.img_size = check_img_size(img_size)
        _check_max_images(max_images)
        if not self.img_dir.is_dir():
            raise InputError(f"image folder not found: {self.img_dir}: pass a folder of images")
        paths = [p for p in self.img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not paths:
            raise InputError(
                f"no images found in {self.img_dir} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}): "
                "pass a folder that contains images"
            )
        # Sort on the relative path so the order does not depend on where the folder lives.
        self.paths: list[Path] = sorted(paths, key=lambda p: p.relative_to(self.img_dir).as_posix())[:max_images]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = _load_item(self.paths[index], self.img_size, None)
        item["image_id"] = index
        item["targets"] = torch.zeros(0, 5, dtype=torch.float32)
        return item


def readable_images(batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
    """The readable images of a batch: a collate_detection dict (items with ok=False left out) or a tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    images = batch["image"]
    ok = batch.get("ok")
    return images if ok is None else images[torch.as_tensor(ok, dtype=torch.bool)]


def collate_detection(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: 'image' -> [B,3,S,S], 'targets' -> [M,6] (batch_index, class, x1, y1, x2, y2), rest -> lists."""
    out: dict[str, Any] = {key: [item[key] for item in batch] for key in batch[0] if key not in ("image", "targets")}
    out["image"] = torch.stack([item["image"] for item in batch])
    targets = [
        torch.cat([torch.full((len(item["targets"]), 1), float(i)), item["targets"]], dim=1)
        for i, item in enumerate(batch)
    ]
    out["targets"] = torch.cat(targets) if targets else torch.zeros(0, 6)
    return out


def create_dataloader(
    dataset: Dataset, batch_size: int, workers: int = 2, shuffle: bool = False, seed: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Deterministic DataLoader with collate_detection; workers=0 loads in the main process."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {batch_size!r}: e.g. use 32")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"--workers must be an integer >= 0, got {workers!r}: use 0 to load in the main process")
    generator = torch.Generator()
    generator.manual_seed(seed)
    batches = None if shuffle or not hasattr(dataset, "batches") else dataset.batches(batch_size)
    if batches is not None:  # images of one batch share a canvas (the rect geometry)
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_detection,
                          pin_memory=pin_memory, persistent_workers=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_detection,
        pin_memory=pin_memory,
        drop_last=False,
        generator=generator,
        persistent_workers=False,
    )
