"""Write a freshly initialised (untrained) model from a config as a checkpoint: for smoke tests and pipelines."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

# tools/ is not a package: make the repository root importable when run as `python tools/init_checkpoint.py`.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from models import build_model, load_config, save_checkpoint  # noqa: E402
from models.config import with_overrides  # noqa: E402
from utils.cli import ArgumentParser, positive_int, run_cli  # noqa: E402
from utils.data.coco import read_categories  # noqa: E402

_logger = logging.getLogger("init_checkpoint")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="yolov6n", metavar="NAME|YAML", help="model config name or YAML path")
    parser.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write")
    parser.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                        help="number of classes (default: the config's, or the --data file's)")
    parser.add_argument("--data", default=None, metavar="JSON",
                        help="COCO annotation file to take the class count and names from")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="weight initialisation seed")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    names = None
    if args.data:
        names = read_categories(args.data)[1]
    config = with_overrides(config, num_classes=args.num_classes or (len(names) if names else None), names=names)
    torch.manual_seed(args.seed)
    model = build_model(config).eval()
    save_checkpoint(args.out, model, meta={"seed": args.seed, "trained": False})
    _logger.info("wrote untrained %s (%d classes) to %s", config["name"], config["num_classes"], args.out)
    return {"out": args.out, "config": config["name"], "num_classes": config["num_classes"]}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
