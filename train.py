"""Train a YOLOv6 model from a config on COCO-format data (CPU or GPU), as YOLOv6 v3 trains: TAL assignment,
VarifocalLoss + GIoU (+ DFL), SGD with warm-up and cosine LR, weight EMA, mosaic/affine/HSV/flip augmentation."""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from models import build_model, load_config, read_checkpoint
from models.config import with_overrides
from utils.cli import (
    ArgumentParser,
    add_device_argument,
    args_dict,
    img_size,
    non_negative_int,
    positive_int,
    resolve_device,
    run_cli,
    unit_interval,
    write_json,
)
from utils.data.coco import CocoDetection
from utils.errors import InputError
from utils.training.augment import AugmentConfig
from utils.training.loop import TrainConfig, Trainer

_logger = logging.getLogger("train")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--config", default="yolov6n", metavar="NAME|YAML", help="model config name or YAML path")
    model.add_argument("--weights", default=None, metavar="FILE",
                       help="start from these weights (a checkpoint of the same variant) instead of random init")
    add_device_argument(model)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="JSON", help="training annotations (COCO instances JSON)")
    data.add_argument("--images", required=True, metavar="DIR", help="training images")
    data.add_argument("--val-data", required=True, metavar="JSON", help="validation annotations")
    data.add_argument("--val-images", required=True, metavar="DIR", help="validation images")
    data.add_argument("--img-size", type=img_size, default=640, metavar="N", help="training and evaluation size")
    data.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")
    solver = parser.add_argument_group("solver")
    defaults = TrainConfig()
    solver.add_argument("--epochs", type=positive_int, default=defaults.epochs, metavar="N", help="epochs")
    solver.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, metavar="N", help="batch")
    solver.add_argument("--nominal-batch", type=positive_int, default=defaults.nominal_batch, metavar="N",
                        help="images per optimizer step (gradient accumulation)")
    solver.add_argument("--lr0", type=float, default=defaults.lr0, metavar="LR", help="initial learning rate")
    solver.add_argument("--lrf", type=float, default=defaults.lrf, metavar="F", help="final LR factor (cosine)")
    solver.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs, metavar="E",
                        help="linear warm-up length")
    solver.add_argument("--mosaic", type=unit_interval, default=AugmentConfig().mosaic, metavar="P",
                        help="mosaic probability")
    solver.add_argument("--no-mosaic-last", type=non_negative_int, default=defaults.no_mosaic_last, metavar="N",
                        help="train the last N epochs without mosaic")
    solver.add_argument("--eval-interval", type=positive_int, default=defaults.eval_interval, metavar="K",
                        help="evaluate on the validation set every K epochs (and after the last)")
    solver.add_argument("--seed", type=int, default=0, metavar="S", help="seed for init, shuffling, augmentation")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="runs/train", metavar="DIR", help="last.pt, best.pt, results.csv")
    out.add_argument("--resume", nargs="?", const="", default=None, metavar="LAST_PT",
                     help="continue from OUTPUT_DIR/last.pt (or the given file)")
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")
    out.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def build_train_model(args: argparse.Namespace, class_names: list[str]) -> torch.nn.Module:
    """A model for the dataset's classes: from --weights if given, else freshly initialised from --config."""
    if args.weights:
        ckpt = read_checkpoint(args.weights)
        if ckpt.deployed:
            raise InputError(f"--weights {args.weights} is a deployed (reparameterized) model; train from a "
                             "training-form checkpoint")
        config = ckpt.config
    else:
        config = load_config(args.config)
    config = with_overrides(config, num_classes=len(class_names), names=class_names)
    model = build_model(config)
    if args.weights:
        own = model.state_dict()
        # A checkpoint for other classes still gives the backbone, neck and box branches; class layers start fresh.
        fitting = {k: v for k, v in ckpt.state_dict.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fitting, strict=False)
        skipped = sorted(set(own) - set(fitting))
        if skipped:
            _logger.info("--weights: %d tensors of other shapes start fresh (e.g. %s)", len(skipped), skipped[0])
    return model


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    train_set = CocoDetection(args.data, args.images, img_size=args.img_size)
    val_set = CocoDetection(args.val_data, args.val_images, img_size=args.img_size)
    model = build_train_model(args, train_set.class_names)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, nominal_batch=args.nominal_batch, lr0=args.lr0,
                      lrf=args.lrf, warmup_epochs=args.warmup_epochs, no_mosaic_last=args.no_mosaic_last,
                      eval_interval=args.eval_interval, workers=args.workers, seed=args.seed,
                      augment=AugmentConfig(mosaic=args.mosaic))
    trainer = Trainer(model, train_set, val_set, cfg, args.output_dir, device, progress=not args.no_progress)
    if args.resume is not None:
        trainer.resume(args.resume or f"{args.output_dir}/last.pt")
    results = trainer.fit()
    write_json(f"{args.output_dir}/train_results.json", {**results, "args": args_dict(args)})
    print(f"trained {cfg.epochs} epochs in {results['minutes']} min: mAP50 {results['mAP50']:.4f} "
          f"mAP50-95 {results['mAP50_95']:.4f} (best {results['best_mAP50_95']:.4f}) -> {results['best']}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
