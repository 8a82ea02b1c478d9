"""Train a YOLOv6 model from a config on COCO-format data (CPU or GPU), as YOLOv6 v3 trains: TAL assignment,
VarifocalLoss + GIoU (+ DFL), SGD with warm-up and cosine LR, weight EMA, mosaic/affine/HSV/flip augmentation.

With --qat: quantization-aware fine-tuning of a calibrated or partial INT8 checkpoint (sensitivity_analyse.py's
calibrated.pt, partial_quant.py's partial.pt) by self-distillation, without labels: the fake-quantized model learns
to reproduce its own float outputs (the head's boxes and scores, optionally the neck) on any image folder. Float
layers stay float, concat-style sharing of input amax holds, weight amax follow the weights; writes qat.pt (export it
with export_onnx.py, evaluate it with eval_coco.py), qat.json (before / after mAP, schedule) and last.pt (--resume).
QAT lives here, not in partial_quant.py, because it is training (schedule, EMA, resume) of whatever model the
fallback chose; partial_quant.py stays the script that chooses float layers."""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path
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
from utils.data.coco import CocoDetection, add_letterbox_argument, model_stride
from utils.errors import InputError
from utils.fileio import check_output_file
from utils.inference.bootstrap import format_drop, paired_bootstrap, rounded_drop
from utils.quant import quantizers as quant
from utils.quant.calibration import amax_sha256, is_calibrated_file, load_calibrated
from utils.training.augment import AugmentConfig
from utils.training.loop import TrainConfig, Trainer
from utils.training.qat import OPTIMIZERS, QatConfig, QatTrainer

_logger = logging.getLogger("train")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--config", default="yolov6n", metavar="NAME|YAML", help="model config name or YAML path")
    model.add_argument("--weights", default=None, metavar="FILE",
                       help="start from these weights (a checkpoint of the same variant) instead of random init; "
                            "--qat: the calibrated or partial checkpoint to fine-tune")
    add_device_argument(model)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="JSON",
                      help="training annotations (COCO instances JSON; not used by --qat)")
    data.add_argument("--images", required=True, metavar="DIR",
                      help="training images (--qat: any image folder, searched recursively)")
    data.add_argument("--val-data", default=None, metavar="JSON",
                      help="validation annotations (--qat: optional, for the before / after mAP)")
    data.add_argument("--val-images", default=None, metavar="DIR", help="validation images")
    data.add_argument("--img-size", type=img_size, default=640, metavar="N", help="training and evaluation size")
    add_letterbox_argument(data, extra_help=" (the validation mAP; training images are square)")
    data.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")
    solver = parser.add_argument_group("solver")
    defaults = TrainConfig()
    solver.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                        help=f"epochs (default: {defaults.epochs}; --qat: {QatConfig().epochs})")
    solver.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, metavar="N", help="batch")
    solver.add_argument("--nominal-batch", type=positive_int, default=defaults.nominal_batch, metavar="N",
                        help="images per optimizer step (gradient accumulation)")
    solver.add_argument("--lr0", type=float, default=None, metavar="LR",
                        help=f"initial learning rate (default: {defaults.lr0}; --qat: {QatConfig().lr})")
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
    qat = parser.add_argument_group("quantization-aware fine-tuning (--qat)")
    qat.add_argument("--qat", action="store_true",
                     help="fine-tune the calibrated / partial INT8 checkpoint --weights towards its float outputs")
    qat.add_argument("--optimizer", choices=OPTIMIZERS, default=QatConfig().optimizer, help="--qat optimizer")
    qat.add_argument("--neck-weight", type=float, default=0.0, metavar="W",
                     help="add W x the neck outputs' noise-to-signal ratio to the head's (default 0: head only)")
    qat.add_argument("--learn-amax", action="store_true",
                     help="also learn the input amax (one per sharing group, straight-through gradient)")
    qat.add_argument("--ema", action="store_true", help="keep an EMA of the weights and save it")
    qat.add_argument("--flip", type=unit_interval, default=QatConfig().flip, metavar="P",
                     help="horizontal-flip probability of the fine-tuning images")
    qat.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                     help="fine-tune on the first N images of --images (sorted; default: all)")
    qat.add_argument("--overwrite", action="store_true", help="--qat: replace an existing qat.pt / qat.json")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, metavar="DIR",
                     help="last.pt, best.pt, results.csv (default: runs/train; --qat: runs/qat, with qat.pt and "
                          "qat.json)")
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


def check_mode(args: argparse.Namespace) -> None:
    """Float training needs labels and a validation set; --qat needs a calibrated checkpoint and no labels."""
    if args.qat:
        if args.data:
            raise InputError("--qat learns from the float model's own outputs and uses no labels: drop --data "
                             "(--images is enough)")
        if not args.weights or not is_calibrated_file(args.weights):
            raise InputError(f"--qat fine-tunes a calibrated or partial INT8 checkpoint, got --weights "
                             f"{args.weights}: pass sensitivity_analyse.py's calibrated.pt or partial_quant.py's "
                             "partial.pt")
        if (args.val_data is None) != (args.val_images is None):
            raise InputError("pass --val-data and --val-images together (or neither: mAP is then not measured)")
        return
    missing = [flag for flag, value in (("--data", args.data), ("--val-data", args.val_data),
                                        ("--val-images", args.val_images)) if value is None]
    if missing:
        raise InputError(f"training needs labels and a validation set: pass {', '.join(missing)} (or --qat to "
                         "fine-tune a calibrated checkpoint without labels)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_mode(args)
    if args.qat:
        return fine_tune(args)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    args.output_dir = args.output_dir or "runs/train"
    train_set = CocoDetection(args.data, args.images, img_size=args.img_size)
    model = build_train_model(args, train_set.class_names)
    val_set = CocoDetection(args.val_data, args.val_images, img_size=args.img_size, letterbox=args.letterbox,
                            stride=model_stride(model))
    defaults = TrainConfig()
    cfg = TrainConfig(epochs=args.epochs or defaults.epochs, batch_size=args.batch_size,
                      nominal_batch=args.nominal_batch, lr0=defaults.lr0 if args.lr0 is None else args.lr0,
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


def _map(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    return None if metrics is None else {k: round(float(metrics[k]), 4) for k in ("mAP50_95", "mAP50")}


def val_drop(trainer: QatTrainer, final: torch.nn.Module, float_metrics: dict[str, Any] | None,
             seed: int) -> dict[str, Any]:
    """The fine-tuned model's val mAP and its drop from the float teacher with the 95 % paired-bootstrap interval."""
    metrics = trainer.evaluate(final, matches=True)
    reference = float_metrics or trainer.evaluate(trainer.teacher, matches=True)
    return {"map": _map(metrics), "drop_interval": rounded_drop(paired_bootstrap(reference["matches"],
                                                                                 metrics["matches"], seed=seed))}


def fine_tune(args: argparse.Namespace) -> dict[str, Any]:
    """--qat: self-distillation of --weights on --images; qat.pt, qat.json, last.pt, results.csv in --output-dir."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    out = Path(args.output_dir or "runs/qat")
    resuming = args.resume is not None
    outputs = {name: check_output_file(out / name, args.overwrite or resuming, "--output-dir")
               for name in ("qat.pt", "qat.json")}
    defaults = QatConfig()
    cfg = QatConfig(epochs=args.epochs or defaults.epochs, batch_size=args.batch_size,
                    lr=defaults.lr if args.lr0 is None else args.lr0, lrf=args.lrf, optimizer=args.optimizer,
                    neck_weight=args.neck_weight, learn_amax=args.learn_amax, ema=args.ema, flip=args.flip,
                    max_images=args.max_images, eval_interval=args.eval_interval, workers=args.workers,
                    seed=args.seed)
    start_model = load_calibrated(args.weights, device)
    val_set = CocoDetection(args.val_data, args.val_images, img_size=args.img_size, letterbox=args.letterbox,
                            stride=model_stride(start_model)) if args.val_data else None
    start_sha = amax_sha256(start_model)
    trainer = QatTrainer(start_model, args.images, cfg, out, args.img_size, device, val_set=val_set,
                         progress=not args.no_progress)
    if resuming:
        trainer.resume(args.resume or out / "last.pt")
    before = {"loss": trainer.distillation_loss(trainer.student)} if trainer.start_epoch == 0 else {}
    float_metrics = None
    if before and val_set is not None:
        float_metrics = trainer.evaluate(trainer.teacher, matches=True)
        before.update(float=_map(float_metrics), start=_map(trainer.evaluate(trainer.student)))
    history = trainer.fit()
    final = trainer.final_model()
    path = trainer.save(outputs["qat.pt"], final, meta={"weights": str(args.weights)})
    after = {"loss": trainer.distillation_loss(final)}
    if val_set is not None:
        after.update(val_drop(trainer, final, float_metrics, args.seed), letterbox=args.letterbox)
    int8, total = quant.count_quantized(final)
    record = {"checkpoint": str(path), "from": str(args.weights), "from_amax_sha256": start_sha,
              "int8_layers": int8, "total_layers": total,
              "before": before or None, "after": after, "minutes": round(trainer.seconds / 60, 2),
              "images": len(trainer.dataset), "history": history, "schedule": asdict(cfg), "args": args_dict(args)}
    write_json(outputs["qat.json"], record)
    loss = f"distillation loss {before['loss']:.5f} -> {after['loss']:.5f}" if before else \
        f"distillation loss {after['loss']:.5f}"
    if "map" not in after:
        scores = f"{loss}; mAP not measured (pass --val-data and --val-images, or run eval_coco.py on it)"
    else:
        start = before.get("start")
        scores = (f"{loss}; val mAP50-95 {after['map']['mAP50_95']:.4f}, drop from float "
                  f"{format_drop(after['drop_interval'])} ({args.letterbox} canvases)" +
                  (f" (float {before['float']['mAP50_95']:.4f}, before fine-tuning {start['mAP50_95']:.4f})"
                   if start else ""))
    print(f"fine-tuned {int8}/{total} INT8 layers for {cfg.epochs} epochs in {record['minutes']} min: {scores} "
          f"-> {path}\nexport: python export_onnx.py --weights {path} --img-size {args.img_size}")
    return record


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
