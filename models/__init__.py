"""The YOLOv6 family as plain nn.Modules whose state_dict keys are those of YOLOv6's releases.

Entry points: ``load_model(path, deploy=True, device="cpu")`` for any supported checkpoint, ``build_model(config)``
for a fresh model, ``reparameterize(model)`` for the deployed form.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from models.config import load_config
from models.reparam import is_deployed, reparameterize
from models.yolo import Model, build_model
from utils.errors import InputError

__all__ = ["Checkpoint", "Model", "build_model", "is_deployed", "load_config", "load_model", "model_from_checkpoint",
           "read_checkpoint", "reparameterize", "save_checkpoint"]


def model_from_checkpoint(ckpt: Checkpoint, source: str | Path = "checkpoint") -> Model:
    """Build the model a checkpoint describes and load its weights strictly (FP32, eval mode)."""
    model = build_model(ckpt.config)
    if ckpt.deployed:
        reparameterize(model)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        detail = " ".join(s.strip() for s in first)
        raise InputError(f"{source}: weights do not fit the {ckpt.config.get('name', 'inferred')} model ({detail}); "
                         "the checkpoint is of an unsupported variant") from None
    return model.float().eval()


def load_model(path: str | Path, deploy: bool = True, device: str | torch.device = "cpu") -> Model:
    """An eval-mode FP32 model from a YOLOv6 release .pt or our checkpoint; ``deploy`` reparameterizes it.

    Calling it on a [B,3,H,W] tensor in [0,1] returns [B,N,5+nc] (cx, cy, w, h, objectness, class scores).
    """
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    if deploy:
        reparameterize(model)
    elif ckpt.deployed:
        raise InputError(f"{path} holds a deployed (reparameterized) model; its training form cannot be recovered: "
                         "load it with deploy=True")
    return model.to(torch.device(device))


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Name, parameter count and deployed state, for logs."""
    params = sum(p.numel() for p in model.parameters())
    return {"name": getattr(model, "config", {}).get("name", "?"), "params": params, "deployed": is_deployed(model)}
