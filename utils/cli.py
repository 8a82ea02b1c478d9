"""Shared CLI plumbing: logging set-up, argument types, devices, known errors -> one line + exit 2, results writer."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from utils.errors import InputError
from utils.fileio import atomic_write_text

_logger = logging.getLogger(__name__)

EXIT_INPUT_ERROR = 2


def setup_logging(verbose: bool = False) -> None:
    """One logging configuration for every script: messages on stderr, tqdm bars stay readable."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr,
                        force=True)


def run_cli(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """Run a script's ``main``; bad input becomes one line on stderr and exit code 2, never a traceback."""
    setup_logging(getattr(args, "verbose", False))
    try:
        return main(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a path the user named cannot be read or written (permissions, full disk, ...)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}: check the path, its permissions and the free space",
              file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to help texts that do not mention their default, except for None and flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or no_default or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what is wrong> (see --help)``, exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)


# ------------------------------------------------------------------------------------------------ argument types
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def img_size(text: str) -> int:
    """Input size: a positive multiple of 32 (the largest stride)."""
    value = _int(text)
    if value < 32 or value % 32:
        suggestion = max(32, round(value / 32) * 32)
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32, got {value}: try {suggestion}")
    return value


def unit_interval(text: str) -> float:
    """A threshold in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def device_spec(text: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' (checked for availability when the device is resolved)."""
    text = text.strip().lower()
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def resolve_device(spec: str) -> torch.device:
    """The torch.device for ``--device``; a CUDA device that is not there is an InputError."""
    device = torch.device(device_spec(spec))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec} asked for a CUDA GPU but none is available here; use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", type=device_spec, default="cpu", metavar="DEV",
                        help="cpu, cuda or cuda:N (default: cpu)")


# ------------------------------------------------------------------------------------------------ result files
def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | Path, data: Any) -> Path:
    """The one results writer: pretty JSON, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments actually used, for saving next to results."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
