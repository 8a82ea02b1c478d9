"""Small models and inputs shared by several test modules (the tests folder is a package: ``tests.helpers``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from models import build_model, load_config, reparameterize
from models.config import with_overrides
from utils.data.calibration import calibration_loader
from utils.quant.calibration import calibrated_model

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
SIZE = 64  # image size of the quantization / sensitivity unit tests


def deployed(name: str, seed: int = 0) -> nn.Module:
    """A deployed model with seeded weights and non-zero prediction convs (YOLOv6 zero-initialises them)."""
    torch.manual_seed(seed)
    model = reparameterize(build_model(load_config(name)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in list(model.detect.cls_preds) + list(model.detect.reg_preds):
            conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=g))
    return model.eval()


def images(n: int = 2, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Tiny(nn.Module):
    """Dilated and grouped convs, a max-pool, a transposed conv and a 1x1 conv: every swapped type."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=1, padding=2, dilation=2, groups=1, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.up(self.pool(x))))


def amax_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name)._amax


def tiny_detector(seed: int = 0, dead_channel: bool = False) -> torch.nn.Module:
    """An untrained 6-class yolov6n whose prediction layers are perturbed so that it outputs real detections."""
    torch.manual_seed(seed)
    model = build_model(with_overrides(load_config("yolov6n"), num_classes=6)).eval()
    with torch.no_grad():
        for conv in model.detect.cls_preds:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.5)
        for conv in model.detect.reg_preds:
            conv.weight.normal_(0, 0.02)
            conv.bias.uniform_(1.0, 4.0)
        if dead_channel:
            model.detect.cls_preds[0].weight[0].zero_()
    return model


def calibrated_tiny(model: torch.nn.Module, val: dict) -> torch.nn.Module:
    """``model`` deployed, quantized and max-calibrated on the first 8 images of ``val`` (the ``tiny_val`` fixture)."""
    loader = calibration_loader(val["images"], SIZE, 4, 2, workers=0)
    return calibrated_model(reparameterize(model), loader=loader, batch_number=2)[0]


def load_script(relative_path: str) -> ModuleType:
    """Import a script of tools/ or benchmarks/ (folders of scripts, not packages) by its path in the repository."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_fixture(path: Path) -> Path:
    """``path`` (under ../shared/fixtures), failing the test (not skipping it) when the shared folder is missing."""
    if not Path(path).exists():
        pytest.fail(f"shared fixture {path} not found: clone the repository with ../shared beside it")
    return Path(path)


def one_line_error(script: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``script.main`` through run_cli as a user would: it must exit 2 with one final ``error:`` line on stderr
    (progress logs may come first) and no traceback. Returns that line."""
    from utils.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(script.main, script.get_args_parser().parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err)
    return errors[0]
