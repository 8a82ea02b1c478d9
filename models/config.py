"""Model configs: one YAML file per variant in ``configs/``; resolved into per-layer channels and repeats."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from models.lite import lite_channels  # lite scales widths its own way and has no neck repeats
from utils.errors import InputError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LAYOUTS = ("v2", "v3", "lite")


def available_configs(config_dir: Path = DEFAULT_CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in Path(config_dir).glob("*.yaml"))


def load_config(name_or_path: str | Path, config_dir: Path = DEFAULT_CONFIG_DIR) -> dict[str, Any]:
    """A config by variant name (``yolov6n``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(config_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InputError(f"model config {name_or_path!r} not found; use one of {available_configs(config_dir)} "
                         "or a path to a .yaml file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"model config {path} is not valid YAML ({exc}); fix the file") from None
    return validate_config(config, str(path))


def validate_config(config: Any, source: str = "config") -> dict[str, Any]:
    """Check the keys a model build needs; returns the config."""
    required = {"layout", "block", "backbone", "neck", "head", "num_classes"}
    if not isinstance(config, dict) or not required <= set(config):
        seen = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{source}: a model config needs keys {sorted(required)}, found {seen}")
    if config["layout"] not in LAYOUTS:
        raise InputError(f"{source}: layout must be one of {LAYOUTS}, got {config['layout']!r}")
    return config


def make_divisible(x: float, divisor: int = 8) -> int:
    return math.ceil(x / divisor) * divisor


def resolve_config(config: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Per-layer (channels_list, num_repeats) exactly as YOLOv6 scales its base lists.

    Explicit ``channels_list`` / ``num_repeats_list`` (written by checkpoint inference) take precedence.
    """
    if config["layout"] == "lite":
        out, _, neck_in = lite_channels(config)
        return out + neck_in + [int(config["neck"]["unified_channels"])], list(config["backbone"]["num_repeats"])
    base_repeats = config["backbone"]["num_repeats"] + config["neck"]["num_repeats"]
    base_channels = config["backbone"]["out_channels"] + config["neck"]["out_channels"]
    depth, width = config.get("depth_multiple", 1.0), config.get("width_multiple", 1.0)
    repeats = config.get("num_repeats_list") or [max(round(n * depth), 1) if n > 1 else n for n in base_repeats]
    channels = config.get("channels_list") or [make_divisible(c * width, 8) for c in base_channels]
    return list(channels), list(repeats)


def with_overrides(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A deep copy of ``config`` with top-level keys replaced (e.g. ``num_classes``)."""
    new = copy.deepcopy(config)
    new.update({k: v for k, v in overrides.items() if v is not None})
    return new
