"""Shared test fixtures."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from models import save_checkpoint
from tests.helpers import SIZE, deployed, images, tiny_detector
from utils.data.synthetic import generate_synthetic_coco
from utils.quant import calibration
from utils.quant import quantizers as quant


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one torch thread (restored afterwards).

    Tiny convolutions are far slower with 2 OpenMP threads on a busy 2-core runner; results do not depend on it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _open_handlers(handlers: list[logging.Handler]) -> list[logging.Handler]:
    return [h for h in handlers if not getattr(getattr(h, "stream", None), "closed", False)]


@pytest.fixture(autouse=True)
def restore_logging():
    """run_cli points the root logger at the running test's captured stderr, closed after that test: drop such
    handlers (left by this or other test modules) before each test and restore the root logger afterwards."""
    root = logging.getLogger()
    root.handlers[:] = _open_handlers(root.handlers)
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def yolov6n() -> nn.Module:
    """A deployed yolov6n with seeded weights (see ``tests.helpers.deployed``)."""
    return deployed("yolov6n")


@pytest.fixture(scope="module")
def reopt() -> nn.Module:
    """A deployed v2 RepOpt yolov6n with seeded weights."""
    return deployed("yolov6n_reopt")


@pytest.fixture(scope="module")
def calibrated(yolov6n: nn.Module) -> nn.Module:
    """``yolov6n`` quantized and max-calibrated on two batches of random images."""
    qmodel = quant.quantize_model(yolov6n)
    calibration.calibrate(qmodel, [images(2, seed=1), images(2, seed=2)], num_batches=2, method="max")
    return qmodel


@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory) -> dict:
    """8 synthetic val images at 64 px with their COCO annotations: {"json": file, "images": folder}."""
    out = tmp_path_factory.mktemp("synthetic")
    info = generate_synthetic_coco(out, num_train=0, num_val=8, img_size=SIZE, seed=11)
    return {"json": str(info["val"]["ann_file"]), "images": str(info["val"]["img_dir"])}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """``tests.helpers.tiny_detector()`` saved in our checkpoint format."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", tiny_detector())
