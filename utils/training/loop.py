"""The training loop: SGD (momentum, Nesterov) with warm-up and cosine LR, weight EMA, periodic COCO evaluation,
last/best checkpoints with everything needed to resume."""
from __future__ import annotations

import copy
import csv
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models import reparameterize, save_checkpoint
from utils.data.coco import CocoDetection, create_dataloader
from utils.errors import InputError
from utils.fileio import ensure_folder
from utils.inference.evaluate import evaluate
from utils.inference.runners import TorchRunner
from utils.training.augment import AugmentConfig
from utils.training.dataset import TrainDataset
from utils.training.losses import DetectionLoss

_logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters (YOLOv6's solver defaults where it has them)."""

    epochs: int = 30
    batch_size: int = 16
    nominal_batch: int = 64  # gradients accumulate until this many images, as YOLOv6 does
    lr0: float = 0.02
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    no_mosaic_last: int = 10  # switch mosaic off for the last N epochs
    eval_interval: int = 5
    workers: int = 2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class ModelEMA:
    """Exponential moving average of weights with YOLOv6's ramped decay d = decay * (1 - exp(-updates / tau))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        model_state = model.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(model_state[name].detach(), alpha=1 - d)
            else:
                value.copy_(model_state[name])


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with three groups: conv/linear weights (decayed), BN weights and biases (not decayed)."""
    decayed, bn_weights, biases = [], [], []
    for module in model.modules():
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            biases.append(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            bn_weights.append(module.weight)
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.requires_grad:
            decayed.append(module.weight)
    grouped = {id(p) for p in decayed + bn_weights + biases}
    bn_weights += [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]  # e.g. BottleRep.alpha
    optimizer = torch.optim.SGD(bn_weights, lr=cfg.lr0, momentum=cfg.momentum, nesterov=True)
    optimizer.add_param_group({"params": decayed, "weight_decay": cfg.weight_decay * cfg.batch_size *
                               max(1, round(cfg.nominal_batch / cfg.batch_size)) / cfg.nominal_batch})
    optimizer.add_param_group({"params": biases})
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr0
    return optimizer


def cosine_factor(epoch: float, epochs: int, lrf: float) -> float:
    """LR multiplier: 1 at epoch 0, lrf at the last epoch, cosine in between."""
    return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1


class Trainer:
    """Trains ``model`` on ``train_set``, evaluates on ``val_set``; writes last.pt / best.pt / results.csv."""

    def __init__(self, model: nn.Module, train_set: CocoDetection, val_set: CocoDetection, cfg: TrainConfig,
                 out_dir: str | Path, device: torch.device | str = "cpu", progress: bool = True):
        if train_set.num_annotations() == 0:
            raise InputError(f"{train_set.ann_file} has no usable annotations (non-crowd boxes with positive size); "
                             "training needs labelled images")
        self.model, self.cfg, self.device = model.to(device), cfg, torch.device(device)
        self.train_set = TrainDataset(train_set, cfg.augment, seed=cfg.seed)
        self.val_set, self.out_dir, self.progress = val_set, Path(out_dir), progress
        head = model.detect
        self.loss = DetectionLoss(head.nc, head.stride, head.reg_max, head.use_dfl)
        self.optimizer = build_optimizer(model, cfg)
        self.ema = ModelEMA(model)
        self.start_epoch, self.best_map, self.history = 0, -1.0, []
        self.accumulate = max(1, round(cfg.nominal_batch / cfg.batch_size))

    # ------------------------------------------------------------------------------------------ checkpoints
    def _train_state(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema_updates": self.ema.updates, "best_map": self.best_map, "history": self.history,
                "config": {k: v for k, v in asdict(self.cfg).items() if k != "augment"},
                "augment": asdict(self.cfg.augment)}

    def save(self, epoch: int, metrics: dict[str, Any] | None) -> None:
        scores = {k: metrics[k] for k in ("mAP50", "mAP50_95")} if metrics else {}
        meta = {"epoch": epoch, "trained": True, **scores}
        save_checkpoint(self.out_dir / "last.pt", self.ema.ema, meta=meta,
                        extra={"train_state": self._train_state(epoch)})
        if metrics and metrics["mAP50_95"] > self.best_map:
            self.best_map = metrics["mAP50_95"]
            save_checkpoint(self.out_dir / "best.pt", self.ema.ema, meta=meta)

    def resume(self, path: str | Path) -> None:
        """Continue from a last.pt written by this trainer."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--resume: no checkpoint at {path}; start without --resume or point it at a last.pt")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state = payload.get("train_state") if isinstance(payload, dict) else None
        if state is None:
            raise InputError(f"--resume: {path} has no training state (only last.pt files written by train.py do)")
        self.model.load_state_dict(state["model"])
        self.ema.ema.load_state_dict(payload["state_dict"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.best_map, self.history = state["epoch"] + 1, state["best_map"], state["history"]
        _logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ------------------------------------------------------------------------------------------ training
    def _set_lr(self, iteration: int, warmup_iters: int, epoch: int) -> None:
        factor = cosine_factor(epoch, self.cfg.epochs, self.cfg.lrf)
        for j, group in enumerate(self.optimizer.param_groups):
            target = self.cfg.lr0 * factor
            if iteration < warmup_iters:
                start = self.cfg.warmup_bias_lr if j == 2 else 0.0
                target = start + (target - start) * iteration / warmup_iters
                group["momentum"] = self.cfg.warmup_momentum + (self.cfg.momentum - self.cfg.warmup_momentum) * \
                    iteration / warmup_iters
            group["lr"] = target

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.train_set.epoch = epoch
        if epoch >= cfg.epochs - cfg.no_mosaic_last:
            self.train_set.augment.mosaic = 0.0
        loader = create_dataloader(self.train_set, cfg.batch_size, workers=cfg.workers, shuffle=True,
                                   seed=cfg.seed + epoch)
        warmup_iters = max(round(cfg.warmup_epochs * len(loader)), 1) if cfg.warmup_epochs > 0 else 0
        self.model.train()
        sums: dict[str, float] = {"loss": 0.0, "cls": 0.0, "iou": 0.0, "dfl": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.progress, leave=False)
        for i, batch in enumerate(bar):
            iteration = i + len(loader) * epoch
            self._set_lr(iteration, warmup_iters, epoch)
            outputs = self.model(batch["image"].to(self.device))
            loss, parts = self.loss(outputs, batch["targets"].to(self.device))
            loss.backward()
            if (i + 1) % self.accumulate == 0 or i + 1 == len(loader):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.model)
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
            bar.set_postfix({k: f"{v / (i + 1):.3f}" for k, v in sums.items()})
        return {k: v / max(len(loader), 1) for k, v in sums.items()}

    def evaluate(self) -> dict[str, Any]:
        deployed = reparameterize(copy.deepcopy(self.ema.ema))
        return evaluate(TorchRunner(deployed, self.device), self.val_set, batch_size=self.cfg.batch_size,
                        workers=self.cfg.workers, progress=self.progress)

    def fit(self) -> dict[str, Any]:
        ensure_folder(self.out_dir)
        start = time.perf_counter()
        metrics: dict[str, Any] | None = None
        for epoch in range(self.start_epoch, self.cfg.epochs):
            losses = self.train_one_epoch(epoch)
            last = epoch + 1 == self.cfg.epochs
            metrics = self.evaluate() if last or (epoch + 1) % self.cfg.eval_interval == 0 else None
            row = {"epoch": epoch + 1, **{k: round(v, 4) for k, v in losses.items()},
                   "mAP50": metrics["mAP50"] if metrics else "", "mAP50_95": metrics["mAP50_95"] if metrics else "",
                   "minutes": round((time.perf_counter() - start) / 60, 2)}
            self.history.append(row)
            self.save(epoch, metrics)
            self._write_history()
            _logger.info("epoch %d/%d loss %.3f (cls %.3f iou %.3f dfl %.3f)%s", epoch + 1, self.cfg.epochs,
                         losses["loss"], losses["cls"], losses["iou"], losses["dfl"],
                         f" mAP50 {metrics['mAP50']:.4f} mAP50-95 {metrics['mAP50_95']:.4f}" if metrics else "")
        final = metrics or {}
        return {"epochs": self.cfg.epochs, "best_mAP50_95": self.best_map, "mAP50": final.get("mAP50"),
                "mAP50_95": final.get("mAP50_95"), "minutes": round((time.perf_counter() - start) / 60, 2),
                "last": str(self.out_dir / "last.pt"), "best": str(self.out_dir / "best.pt")}

    def _write_history(self) -> None:
        with open(self.out_dir / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
            writer.writeheader()
            writer.writerows(self.history)
