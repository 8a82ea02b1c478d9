"""Write a small synthetic COCO-format detection dataset (shapes on textured backgrounds) for tests and demos."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

# tools/ is not a package: make the repository root importable when run as `python tools/make_synthetic_coco.py`.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from utils.cli import ArgumentParser, img_size, non_negative_int, run_cli  # noqa: E402
from utils.data.synthetic import generate_synthetic_coco  # noqa: E402

_logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="output folder; gets images/{train,val}/ and annotations/instances_{train,val}.json")
    parser.add_argument("--train", metavar="N", type=non_negative_int, default=200,
                        help="number of training images")
    parser.add_argument("--val", metavar="M", type=non_negative_int, default=50,
                        help="number of validation images")
    parser.add_argument("--img-size", metavar="PX", type=img_size, default=320,
                        help="long side of the images in pixels, a multiple of 32")
    parser.add_argument("--seed", metavar="S", type=non_negative_int, default=0,
                        help="random seed; the same seed gives identical files")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the dataset, print a one-line summary and return generate_synthetic_coco's summary plus 'seconds'."""
    start = time.perf_counter()
    summary = generate_synthetic_coco(args.out, args.train, args.val, img_size=args.img_size, seed=args.seed)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    train, val = summary["train"], summary["val"]
    print(f"wrote {train['images']} train / {val['images']} val images ({train['annotations']} / "
          f"{val['annotations']} boxes) to {summary['out_dir']} in {summary['seconds']:.2f}s")
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
