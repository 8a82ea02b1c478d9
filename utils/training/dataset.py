"""Augmented training samples from a COCO-format dataset: mosaic, random affine, HSV, horizontal flip."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data.coco import CocoDetection, letterbox, read_image_rgb
from utils.training.augment import AugmentConfig, augment_hsv, flip_lr, mosaic_canvas, random_affine

_logger = logging.getLogger(__name__)


class TrainDataset(Dataset):
    """Wraps a CocoDetection; items are {"image": [3,S,S] float in [0,1], "targets": [n,5] letterboxed pixels}.

    Randomness comes from (seed, epoch, index), so samples are reproducible whatever the worker layout; set
    ``epoch`` before each epoch and ``augment.mosaic = 0`` to switch mosaic off.
    """

    def __init__(self, base: CocoDetection, augment: AugmentConfig | None = None, seed: int = 0):
        self.base, self.size, self.seed, self.epoch = base, base.img_size, seed, 0
        self.augment = augment or AugmentConfig()

    def __len__(self) -> int:
        return len(self.base)

    def _resized(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image resized so its long side is ``size`` (no padding) and its labels; unreadable -> blank."""
        img = read_image_rgb(self.base.image_path(index))
        labels = self.base.original_targets(index)
        if img is None:
            _logger.warning("cannot read %s: training on a blank image", self.base.image_path(index))
            return np.full((self.size, self.size, 3), 114, np.uint8), labels[:0]
        ratio = self.size / max(img.shape[:2])
        if ratio != 1:
            new_wh = (max(1, round(img.shape[1] * ratio)), max(1, round(img.shape[0] * ratio)))
            img = cv2.resize(img, new_wh, interpolation=cv2.INTER_LINEAR)
        labels[:, 1:] *= ratio
        return img, labels

    def _letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img, labels = self._resized(index)
        padded, ratio, (pad_x, pad_y) = letterbox(img, self.size)
        labels[:, 1:] *= ratio
        labels[:, [1, 3]] += pad_x
        labels[:, [2, 4]] += pad_y
        return padded, labels

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        cfg = self.augment
        if rng.random() < cfg.mosaic:
            picks = [index] + list(rng.integers(0, len(self), 3))
            parts = [self._resized(int(i)) for i in picks]
            img, labels = mosaic_canvas([p[0] for p in parts], [p[1] for p in parts], self.size, rng)
        else:
            img, labels = self._letterboxed(index)
        img, labels = random_affine(img, labels, rng, cfg, self.size)
        img = augment_hsv(img, rng, cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)
        if rng.random() < cfg.fliplr:
            img, labels = flip_lr(img, labels)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        return {"image": image, "targets": torch.from_numpy(labels.astype(np.float32))}
