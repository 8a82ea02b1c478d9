"""Quantization-aware fine-tuning by self-distillation: the fake-quantized model (student) learns to reproduce its
own float outputs (teacher: the same weights before fine-tuning, every quantizer off) on unlabelled images.

* Loss: the head's noise-to-signal ratio against the teacher, boxes and scores split and weighted as the SQNR proxy
  splits them (``utils.inference.output_error.head_parts``), plus optionally the neck levels' (``neck_weight``).
  The head term is 10^(-SQNR/10): it falls exactly as the proxy that ranks layers and chooses amax rises.
* Gradients pass the fake quantizers straight through (inside the clipping range). Weight amax follow the weights
  (per-channel max |w|, refreshed before every step, as calibration sets them), so the saved checkpoint and its
  Q/DQ export stay consistent. Input amax stay as calibrated, shared within each sharing group (concat inputs and
  the like, ``utils.quant.sharing``), or are learned (``learn_amax``: one parameter per group, so members keep one
  scale; LSQ's straight-through gradient).
* AdamW or SGD, cosine learning rate per step, optional EMA of the weights, ``last.pt`` after every epoch
  (``resume``), deterministic for a seed (data order, flips).
"""
from __future__ import annotations

import copy
import csv
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from utils.data.coco import CocoDetection, ImageFolderDataset, create_dataloader, readable_images
from utils.errors import InputError
from utils.fileio import atomic_output, ensure_folder
from utils.inference.evaluate import evaluate
from utils.inference.output_error import capturing_neck, head_parts
from utils.inference.runners import TorchRunner
from utils.quant import quantizers as quant
from utils.quant.calibration import refresh_weight_amax, save_calibrated
from utils.quant.sharing import input_amax, share_input_amax, trace_sharing_groups
from utils.training.loop import ModelEMA, cosine_factor

_logger = logging.getLogger(__name__)
OPTIMIZERS = ("adamw", "sgd")
_EPS = 1e-12


@dataclass
class QatConfig:
    """Fine-tuning settings (short: the model is trained already; only the quantization error is learned away)."""

    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-4
    lrf: float = 0.01  # the last step's learning rate is lr * lrf (cosine in between)
    optimizer: str = "adamw"
    weight_decay: float = 0.0  # distillation has its own target; decay would pull the weights off it
    neck_weight: float = 0.0
    learn_amax: bool = False
    ema: bool = False
    flip: float = 0.5  # horizontal-flip probability (teacher and student see the same image)
    max_images: int | None = None
    eval_interval: int = 1
    workers: int = 2
    seed: int = 0

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"the learning rate must be a positive number, got {self.lr}: e.g. 1e-4")
        if not 0 < self.lrf <= 1:
            raise InputError(f"the final learning-rate factor must be in (0, 1], got {self.lrf}: e.g. 0.01")
        if not (math.isfinite(self.neck_weight) and self.neck_weight >= 0):
            raise InputError(f"the neck weight must be >= 0, got {self.neck_weight}")


# ------------------------------------------------------------------------------------------------------ loss
def _nsr(ref: torch.Tensor, test: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w (test-ref)^2) / sum(w ref^2): the noise-to-signal ratio, differentiable in ``test``."""
    err = (test - ref) ** 2
    sig = ref ** 2
    if weight is not None:
        err, sig = err * weight, sig * weight
    return err.sum() / sig.sum().clamp_min(_EPS)


def distill_loss(ref: torch.Tensor, test: torch.Tensor, ref_feats: list[torch.Tensor] = (),
                 test_feats: list[torch.Tensor] = (), neck_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The student's (``test``) distance from the teacher's (``ref``) raw head outputs [B,N,5+nc].

    Returns (loss, parts): loss = (box NSR + score NSR) / 2 + neck_weight * mean neck-level NSR; parts holds the
    float values of ``box``, ``score`` (and ``neck``).
    """
    (box_ref, box_test, weight), (score_ref, score_test) = head_parts(ref.detach(), test)
    box, score = _nsr(box_ref, box_test, weight), _nsr(score_ref, score_test)
    loss = (box + score) / 2
    parts = {"box": float(box.detach()), "score": float(score.detach())}
    if neck_weight > 0 and ref_feats:
        neck = sum(_nsr(r.detach(), t) for r, t in zip(ref_feats, test_feats, strict=True)) / len(ref_feats)
        loss = loss + neck_weight * neck
        parts["neck"] = float(neck.detach())
    return loss, parts


# ------------------------------------------------------------------------------------------------ learned amax
def _bounds(quantizer: nn.Module) -> tuple[float, float]:
    """pytorch-quantization's integer range of a quantizer: [-127, 127] for signed 8-bit narrow range."""
    unsigned = bool(getattr(quantizer, "_unsigned", False))
    max_bound = 2.0 ** (quantizer.num_bits - 1 + int(unsigned)) - 1.0
    if unsigned:
        return 0.0, max_bound
    return (-max_bound if getattr(quantizer, "_narrow_range", True) else -max_bound - 1.0), max_bound


def fake_quant_ste(x: torch.Tensor, amax: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Fake quantization as pytorch-quantization computes it (round(x * max_bound / amax), clamped, scaled back),
    with the rounding passed straight through so gradients reach both ``x`` and ``amax`` (LSQ)."""
    low, high = bounds
    scale = high / amax.clamp_min(1e-8)
    y = x * scale
    y = y + (torch.round(y) - y).detach()
    return torch.clamp(y, low, high) / scale


class LearnedInputAmax(nn.Module):
    """Trainable input amax for the INT8 layers: one parameter per sharing group (or per ungrouped layer), used by
    the group's input quantizers while ``attach``-ed; ``write_back`` puts the values into their ``_amax``."""

    def __init__(self, model: nn.Module, groups: list[list[str]]):
        super().__init__()
        layers, in_float = quant.quant_layers(model), set(quant.float_layers(model))
        grouped = {name for group in groups for name in group}
        units = [list(g) for g in groups] + [[name] for name in layers if name not in grouped]
        self.members: list[list[str]] = []
        values = []
        for unit in units:
            active = [name for name in unit if name not in in_float]
            if active:
                self.members.append(active)
                values.append(max(float(layers[name].input_quantizer._amax.max()) for name in active))
        self.amax = nn.Parameter(torch.tensor(values, dtype=torch.float32))
        self._quantizers = {name: layers[name].input_quantizer for unit in self.members for name in unit}

    def attach(self) -> None:
        """Make every member quantizer compute its fake quantization from its group's parameter."""
        for index, unit in enumerate(self.members):
            for name in unit:
                quantizer = self._quantizers[name]
                bounds = _bounds(quantizer)
                quantizer.forward = lambda x, i=index, b=bounds: fake_quant_ste(x, self.amax[i], b)

    def detach_quantizers(self) -> None:
        for quantizer in self._quantizers.values():
            quantizer.__dict__.pop("forward", None)

    @torch.no_grad()
    def write_back(self, model: nn.Module | None = None) -> None:
        """Each member's ``_amax`` := its group's learned value (in ``model``, default the model it was built on)."""
        layers = quant.quant_layers(model) if model is not None else None
        for index, unit in enumerate(self.members):
            value = float(self.amax[index].clamp_min(1e-8))
            for name in unit:
                quantizer = layers[name].input_quantizer if layers is not None else self._quantizers[name]
                quantizer._amax.fill_(value)


# ------------------------------------------------------------------------------------------------------ trainer
def _flip_some(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    if probability <= 0:
        return images
    flip = torch.rand(len(images), generator=generator) < probability
    images = images.clone()
    images[flip] = images[flip].flip(-1)
    return images


def _forward(model: nn.Module, x: torch.Tensor, with_neck: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if not with_neck:
        return model(x), []
    with capturing_neck(model) as captured:
        out = model(x)
    return out, (captured[-1] if captured else [])


class QatTrainer:
    """Fine-tunes a calibrated (or partial) quantized model towards its float self; see the module docstring.

    ``student``: a model from ``load_calibrated`` (its float layers stay float). Writes ``last.pt`` (resume),
    ``results.csv`` and, from ``save``, the fine-tuned calibrated checkpoint.
    """

    def __init__(self, student: nn.Module, images: str | Path, cfg: QatConfig, out_dir: str | Path,
                 img_size: int, device: torch.device | str = "cpu", val_set: CocoDetection | None = None,
                 progress: bool = True):
        cfg.check()
        self.cfg, self.device, self.out_dir, self.progress = cfg, torch.device(device), Path(out_dir), progress
        self.dataset = ImageFolderDataset(images, img_size=img_size, max_images=cfg.max_images)
        self.val_set = val_set
        self.student = student.to(self.device).eval()
        # Sharing holds from the start whatever the input: a partial.pt is shared already, a calibrated.pt is not.
        self.groups = trace_sharing_groups(self.student)
        share_input_amax(self.student, self.groups, input_amax(self.student))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        quant.disable_all(self.teacher)
        self.student.requires_grad_(True)
        self.learned = LearnedInputAmax(self.student, self.groups).to(self.device) if cfg.learn_amax else None
        self.optimizer = self._optimizer()
        self.ema = ModelEMA(self.student, decay=0.999, tau=200.0) if cfg.ema else None
        self.start_epoch, self.history, self.seconds = 0, [], 0.0

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [{"params": [p for p in self.student.parameters() if p.requires_grad]}]
        if self.learned is not None:
            params.append({"params": [self.learned.amax], "weight_decay": 0.0})
        if self.cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, nesterov=True,
                                        weight_decay=self.cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return optimizer

    # -------------------------------------------------------------------------------------------- resume
    def _state(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "history": self.history, "seconds": self.seconds,
                "learned": None if self.learned is None else self.learned.state_dict(),
                "ema": None if self.ema is None else {"state": self.ema.ema.state_dict(),
                                                      "updates": self.ema.updates},
                "config": asdict(self.cfg)}

    def resume(self, path: str | Path) -> None:
        """Continue from a ``last.pt`` this trainer wrote for the same model and settings."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--resume: no QAT checkpoint at {path}; start without --resume or point it at the "
                             "last.pt of an interrupted --qat run")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            if not isinstance(state, dict) or "teacher" not in state:
                raise KeyError("teacher")
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            if self.learned is not None:
                if state["learned"] is None:
                    raise KeyError("learned")
                self.learned.load_state_dict(state["learned"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise InputError(f"--resume: {path} is not the last.pt of a --qat run of this model with these "
                             f"settings ({type(exc).__name__}: {str(exc)[:80]}); start a fresh run") from None
        if self.ema is not None and state["ema"] is not None:
            self.ema.ema.load_state_dict(state["ema"]["state"])
            self.ema.updates = state["ema"]["updates"]
        self.start_epoch, self.history, self.seconds = state["epoch"] + 1, state["history"], state["seconds"]
        _logger.info("resumed from %s after epoch %d", path, self.start_epoch)

    # -------------------------------------------------------------------------------------------- training
    def _loader(self, epoch: int) -> torch.utils.data.DataLoader:
        return create_dataloader(self.dataset, self.cfg.batch_size, workers=self.cfg.workers, shuffle=True,
                                 seed=self.cfg.seed + epoch)

    def _set_lr(self, step: int, total: int) -> None:
        factor = cosine_factor(step, max(total - 1, 1), self.cfg.lrf)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * factor

    def _loss(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``model``'s distillation loss against the teacher on the batch ``x`` (and its parts)."""
        with_neck = self.cfg.neck_weight > 0
        with torch.no_grad():
            ref, ref_feats = _forward(self.teacher, x, with_neck)
        out, feats = _forward(model, x, with_neck)
        return distill_loss(ref, out, ref_feats, feats, self.cfg.neck_weight)

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        loader = self._loader(epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        sums: dict[str, float] = {}
        steps = 0
        if self.learned is not None:
            self.learned.attach()
        try:
            bar = tqdm(loader, desc=f"qat {epoch + 1}/{cfg.epochs}", disable=not self.progress, leave=False)
            for i, batch in enumerate(bar):
                x = readable_images(batch)
                if not len(x):
                    continue
                x = _flip_some(x, cfg.flip, generator).to(self.device)
                self._set_lr(epoch * len(loader) + i, cfg.epochs * len(loader))
                refresh_weight_amax(self.student)
                loss, parts = self._loss(self.student, x)
                if not torch.isfinite(loss):
                    raise InputError(f"the QAT loss became {float(loss)} at epoch {epoch + 1}: lower the learning "
                                     f"rate (now {cfg.lr:g})")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.student)
                steps += 1
                for key, value in {"loss": float(loss.detach()), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value
                bar.set_postfix({k: f"{v / steps:.4f}" for k, v in sums.items()})
        finally:
            if self.learned is not None:
                self.learned.detach_quantizers()
        if steps == 0:
            raise InputError(f"none of the images in {self.dataset.img_dir} could be read: check the folder")
        return {k: v / steps for k, v in sums.items()}

    def final_model(self) -> nn.Module:
        """The fine-tuned model as it is deployed: EMA weights when kept, learned input amax written into the
        quantizers, weight amax = max |w| of the final weights."""
        model = self.ema.ema if self.ema is not None else self.student
        if self.learned is not None:
            self.learned.write_back(model)
        refresh_weight_amax(model)
        return model.eval()

    @torch.no_grad()
    def distillation_loss(self, model: nn.Module) -> float:
        """``model``'s mean loss against the teacher over the fine-tuning images (no flips): before / after."""
        total, batches = 0.0, 0
        loader = create_dataloader(self.dataset, self.cfg.batch_size, workers=self.cfg.workers)
        for batch in tqdm(loader, desc="distillation loss", disable=not self.progress, leave=False):
            x = readable_images(batch).to(self.device)
            if len(x):
                total += float(self._loss(model, x)[0])
                batches += 1
        return total / max(batches, 1)

    def evaluate(self, model: nn.Module, matches: bool = False) -> dict[str, Any]:
        return evaluate(TorchRunner(model, self.device), self.val_set, batch_size=self.cfg.batch_size,
                        workers=self.cfg.workers, progress=self.progress, matches=matches)

    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the per-epoch history (loss parts, val mAP where measured)."""
        ensure_folder(self.out_dir)
        for epoch in range(self.start_epoch, self.cfg.epochs):
            start = time.perf_counter()
            losses = self.train_one_epoch(epoch)
            self.seconds += time.perf_counter() - start
            row: dict[str, Any] = {"epoch": epoch + 1, **{k: round(v, 6) for k, v in losses.items()},
                                   "minutes": round(self.seconds / 60, 2)}
            last = epoch + 1 == self.cfg.epochs
            if self.val_set is not None and (last or (epoch + 1) % self.cfg.eval_interval == 0):
                metrics = self.evaluate(self.final_model())
                row.update(mAP50=round(metrics["mAP50"], 4), mAP50_95=round(metrics["mAP50_95"], 4))
            self.history.append(row)
            with atomic_output(self.out_dir / "last.pt") as tmp:  # a crash mid-write keeps the previous epoch's
                torch.save(self._state(epoch), tmp)
            self._write_history()
            _logger.info("qat epoch %d/%d loss %.5f%s", epoch + 1, self.cfg.epochs, losses["loss"],
                         f" mAP50-95 {row['mAP50_95']:.4f}" if "mAP50_95" in row else "")
        return self.history

    def _write_history(self) -> None:
        fields = list(dict.fromkeys(k for row in self.history for k in row))
        with open(self.out_dir / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)

    def save(self, path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
        """``model`` (``final_model()``) as the fine-tuned calibrated checkpoint (``load_calibrated`` /
        export_onnx.py / eval_coco.py read it)."""
        model.quant_calib = {**dict(getattr(self.student, "quant_calib", {})),
                             "qat": {"epochs": self.cfg.epochs, "lr": self.cfg.lr,
                                     "optimizer": self.cfg.optimizer, "learn_amax": self.cfg.learn_amax}}
        return save_calibrated(path, model, meta=meta)
