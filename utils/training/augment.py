"""Training augmentation on letterboxed RGB uint8 images with [n,5] (class, x1, y1, x2, y2) pixel labels."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114


@dataclass
class AugmentConfig:
    """YOLOv6's data_aug defaults; ``mosaic`` is a probability."""

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float, sgain: float, vgain: float) -> np.ndarray:
    """Random hue/saturation/value gains through lookup tables."""
    gains = rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def flip_lr(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    labels = labels.copy()
    labels[:, [1, 3]] = w - labels[:, [3, 1]]
    return np.ascontiguousarray(img[:, ::-1]), labels


def _affine_matrix(rng: np.random.Generator, cfg: AugmentConfig, in_hw: tuple[int, int], out_size: int
                   ) -> np.ndarray:
    """Centre -> rotate/scale -> shear -> translate, as a 3x3 matrix mapping input to output pixels."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D((0, 0), rng.uniform(-cfg.degrees, cfg.degrees),
                                      rng.uniform(1 - cfg.scale, 1 + cfg.scale))
    shear = np.eye(3)
    shear[0, 1] = math.tan(math.radians(rng.uniform(-cfg.shear, cfg.shear)))
    shear[1, 0] = math.tan(math.radians(rng.uniform(-cfg.shear, cfg.shear)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * out_size
    move[1, 2] = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * out_size
    return move @ shear @ rot @ centre


def _transform_boxes(labels: np.ndarray, matrix: np.ndarray, out_size: int) -> np.ndarray:
    """Map box corners, take their bounding box, clip, and drop boxes that mostly left the image."""
    if not len(labels):
        return labels
    corners = labels[:, [1, 2, 3, 2, 3, 4, 1, 4]].reshape(-1, 2)
    corners = np.c_[corners, np.ones(len(corners))] @ matrix.T
    corners = corners[:, :2].reshape(-1, 8)
    xs, ys = corners[:, 0::2], corners[:, 1::2]
    boxes = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1).clip(0, out_size)
    out = np.c_[labels[:, :1], boxes].astype(np.float32)
    return out[_keep_boxes(labels[:, 1:], boxes, matrix)]


def _keep_boxes(before: np.ndarray, after: np.ndarray, matrix: np.ndarray, min_px: float = 2.0,
                min_area_ratio: float = 0.1, max_aspect: float = 20.0) -> np.ndarray:
    w0, h0 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    scale = math.sqrt(abs(np.linalg.det(matrix[:2, :2])))
    aspect = np.maximum(w1 / (h1 + 1e-16), h1 / (w1 + 1e-16))
    return (w1 > min_px) & (h1 > min_px) & (w1 * h1 / (w0 * h0 * scale ** 2 + 1e-16) > min_area_ratio) & \
        (aspect < max_aspect)


def random_affine(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                  out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random scale/translate (and rotation/shear if configured) into an out_size x out_size image."""
    matrix = _affine_matrix(rng, cfg, img.shape[:2], out_size)
    warped = cv2.warpAffine(img, matrix[:2], (out_size, out_size), borderValue=(PAD_VALUE,) * 3)
    return warped, _transform_boxes(labels, matrix, out_size)


def mosaic_canvas(images: list[np.ndarray], labels: list[np.ndarray], size: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Four images (long side ``size``) around a random centre of a 2*size canvas; labels shifted along."""
    canvas = np.full((2 * size, 2 * size, 3), PAD_VALUE, dtype=np.uint8)
    xc, yc = (int(rng.uniform(0.5 * size, 1.5 * size)) for _ in range(2))
    out_labels = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        h, w = img.shape[:2]
        x1, y1 = (xc - w if k in (0, 2) else xc), (yc - h if k in (0, 1) else yc)
        cx1, cy1 = max(x1, 0), max(y1, 0)
        cx2, cy2 = min(x1 + w, 2 * size), min(y1 + h, 2 * size)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
        lab = lab.copy()
        lab[:, [1, 3]] += x1
        lab[:, [2, 4]] += y1
        out_labels.append(lab)
    merged = np.concatenate(out_labels) if out_labels else np.zeros((0, 5), np.float32)
    merged[:, 1:] = merged[:, 1:].clip(0, 2 * size)
    return canvas, merged
