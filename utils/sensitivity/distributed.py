"""Sensitivity analysis under torchrun: every rank analyses its share of layers as a shard (``--shard RANK/WORLD``
with its own progress file), rank 0 merges when all are done.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the process group is gloo on CPU and nccl on CUDA (each rank on
``cuda:LOCAL_RANK``) and only ever synchronises (barriers), never moves tensors: the shards meet in their progress
files, so a rank that dies loses at most the layer it was analysing, and a rerun with ``--resume`` continues each
shard. Across machines the output folder must be shared (or the shard files gathered before ``--merge``).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from utils.errors import InputError

# Barriers wait for the slowest shard, which may analyse for hours: a generous limit instead of gloo's 30 minutes.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


def torchrun_shard() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise InputError("RANK / WORLD_SIZE are not integers: launch with torchrun, or unset them") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise InputError(f"RANK {rank} is outside WORLD_SIZE {world}: launch with torchrun")
    return rank, world


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device becomes this rank's GPU (LOCAL_RANK); CPU stays CPU."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s): use --nproc-per-node "
                         f"{torch.cuda.device_count()} or fewer")
    return torch.device("cuda", local)


def init_group(device: torch.device) -> None:
    """Join torchrun's process group (once): nccl for CUDA, gloo otherwise."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
