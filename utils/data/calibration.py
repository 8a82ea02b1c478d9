"""Calibration images: the first N of a folder in sorted order, letterboxed, never shuffled or augmented."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from utils.data.coco import ImageFolderDataset, create_dataloader, readable_images
from utils.errors import InputError
from utils.fileio import file_sha256


def images_sha256(dataset: ImageFolderDataset) -> str:
    """A hash of the images' relative paths and bytes."""
    digest = hashlib.sha256()
    for path in dataset.paths:
        digest.update(path.relative_to(dataset.img_dir).as_posix().encode())
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def calibration_loader(data_root: str | Path, img_size: int, batch_size: int, batch_number: int,
                       workers: int = 2) -> torch.utils.data.DataLoader:
    """The first ``batch_size * batch_number`` images of ``data_root`` in sorted order, letterboxed, not shuffled."""
    dataset = ImageFolderDataset(data_root, img_size=img_size, max_images=batch_size * batch_number)
    return create_dataloader(dataset, batch_size, workers=workers, shuffle=False)


def proxy_batches(data_root: str | Path, img_size: int, num_images: int, batch_size: int,
                  workers: int = 2) -> tuple[list[torch.Tensor], ImageFolderDataset]:
    """The first ``num_images`` calibration images (sorted order) as batches; unreadable images left out."""
    dataset = ImageFolderDataset(data_root, img_size=img_size, max_images=num_images)
    batches = []
    for batch in create_dataloader(dataset, batch_size, workers=workers):
        images = readable_images(batch)
        if len(images):
            batches.append(images)
    if not batches:
        raise InputError(f"none of the first {num_images} images in {data_root} could be read: check the folder")
    return batches, dataset
