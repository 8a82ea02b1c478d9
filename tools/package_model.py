"""Package a trained checkpoint for distribution: FP16 weights (training form), metadata, sha256 and a JSON record."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

# tools/ is not a package: make the repository root importable when run as `python tools/package_model.py`.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from models import load_model, read_checkpoint, save_checkpoint  # noqa: E402
from utils.cli import ArgumentParser, run_cli, write_json  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.fileio import file_sha256  # noqa: E402

_logger = logging.getLogger("package_model")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE", help="checkpoint to package (e.g. best.pt)")
    parser.add_argument("--out", required=True, metavar="FILE", help="packaged checkpoint to write")
    parser.add_argument("--record", default=None, metavar="JSON",
                        help="JSON merged into the record written next to --out (training command, numbers)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = read_checkpoint(args.weights)
    if ckpt.deployed:
        raise InputError(f"{args.weights} is deployed; package the training form (train.py's best.pt)")
    model = load_model(args.weights, deploy=False)
    out = save_checkpoint(args.out, model, meta=ckpt.meta, half=True)
    record = json.loads(Path(args.record).read_text()) if args.record else {}
    record.update({"file": out.name, "sha256": file_sha256(out), "bytes": out.stat().st_size, "meta": ckpt.meta,
                   "config": model.config["name"], "num_classes": model.config["num_classes"]})
    write_json(out.with_suffix(".json"), record)
    _logger.info("wrote %s (%.2f MB, sha256 %s)", out, record["bytes"] / 1e6, record["sha256"])
    return record


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
