"""The progress store of an analysis: JSONL progress files, resume, shards and their merge.

Results are appended to a JSONL progress file as soon as each layer is done (flushed and fsync'ed); its first line
identifies model, method, calibration, image size and data, so a resumed run skips finished layers and refuses a
file made for something else. ``shard=(k, n)`` analyses every n-th layer starting at k; ``merge_shards`` joins them.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from utils.errors import InputError
from utils.fileio import atomic_write_text
from utils.sensitivity.metrics import check_direction, check_method, ranking_name

_logger = logging.getLogger(__name__)

PROGRESS_FORMAT = "yolov6-partial-quant/sensitivity-progress"
PROGRESS_VERSION = 1


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"must be K/N with 0 <= K < N (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def shard_layers(layers: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    return list(layers) if shard is None else list(layers[shard[0]::shard[1]])


def progress_path(output: str | Path, method: str, shard: tuple[int, int] | None = None,
                  direction: str = "single") -> Path:
    suffix = "" if shard is None else f".shard{shard[0]}of{shard[1]}"
    return Path(output) / f"progress_{ranking_name(method, direction)}{suffix}.jsonl"


def make_header(*, model: dict[str, Any], method: str, calibration: dict[str, Any], img_size: int,
                data: dict[str, Any], layer_info: list[dict[str, Any]], shard: tuple[int, int] | None,
                direction: str = "single") -> dict:
    """The first line of a progress file: what the results are valid for."""
    calibration = {k: v for k, v in calibration.items() if k in ("method", "percentile", "amax_sha256")}
    layers = [{k: info.get(k) for k in ("name", "type", "weight_shape", "params")} for info in layer_info]
    return {"type": "header", "format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "model": model,
            "method": check_method(method), "direction": check_direction(direction), "calibration": calibration,
            "img_size": img_size, "data": data,
            "layers": layers, "shard": list(shard) if shard else None}


_HEADER_FIELDS = ("format", "version", "model", "method", "direction", "calibration", "img_size", "data", "layers",
                  "shard")
_FIELD_WORDS = {"model": "model (weights sha256 / config)", "method": "method", "direction": "direction",
                "calibration": "calibration",
                "img_size": "image size", "data": "evaluation data", "layers": "layer list", "shard": "shard"}


def _mismatch(saved: dict[str, Any], header: dict[str, Any], fields: Iterable[str]) -> str | None:
    for key in fields:
        if saved.get(key) != header.get(key):
            what = _FIELD_WORDS.get(key, key)
            if key in ("layers",):
                return f"another {what}"
            return f"another {what} ({_short(saved.get(key))} there, {_short(header.get(key))} now)"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def check_progress(path: str | Path, model: dict[str, Any], method: str, resume: bool, overwrite: bool,
                   direction: str = "single") -> None:
    """Fail fast (before calibrating) on a progress file that is there without --resume, or of another model or
    method; the full header check happens in ProgressFile."""
    path = Path(path)
    if not path.exists():
        return
    if not (resume or overwrite):
        raise InputError(f"{path} exists (an earlier run): pass --resume to continue it or --overwrite to start over")
    if resume:
        saved = read_progress(path)[0]
        problem = _mismatch(saved, {**saved, "model": model, "method": method, "direction": direction},
                            ("model", "method", "direction"))
        if problem:
            raise InputError(f"cannot resume {path}: it was written for {problem}; use another --output, or "
                             "--overwrite to start over")


def read_progress(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(header, records, bytes of intact lines) of a progress file; a torn last line is dropped with a warning.

    Raises:
        InputError: not a progress file, or a damaged line before the last one.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good = [], 0
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if not line.strip():
            if not last:
                good += len(line) + 1
            continue
        try:
            record = json.loads(line)
            if last:  # no newline after it: written up to the closing brace, but not finished
                raise ValueError("unterminated")
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if last or (number == len(lines) - 1 and not lines[-1]):
                _logger.warning("%s: ignoring an incomplete last line (the run was interrupted while writing it)",
                                path)
                break
            raise InputError(f"{path} is damaged at line {number}; pass --overwrite to start over") from None
        records.append(record)
        good += len(line) + 1
    if not records or records[0].get("type") != "header" or records[0].get("format") != PROGRESS_FORMAT:
        raise InputError(f"{path} is not a sensitivity progress file (no header line); remove it or pass "
                         "--overwrite")
    records[0].setdefault("direction", "single")  # files written before there were two directions
    return records[0], records[1:], good


class ProgressFile:
    """The JSONL progress of one analysis: a header line, then one line per finished layer or baseline.

    Args:
        resume: continue an existing file (its header must equal ``header``); without it an existing file is
            an error unless ``overwrite``.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], resume: bool = False, overwrite: bool = False):
        self.path, self.header = Path(path), header
        self.layers: dict[str, dict[str, Any]] = {}
        self.baselines: dict[str, dict[str, float]] = {}
        exists = self.path.exists()
        if exists and not (resume or overwrite):
            raise InputError(f"{self.path} exists (an earlier run): pass --resume to continue it or --overwrite to "
                             "start over")
        if exists and resume:
            saved, records, good = read_progress(self.path)
            problem = _mismatch(saved, header, _HEADER_FIELDS)
            if problem:
                raise InputError(f"cannot resume {self.path}: it was written for {problem}; use another --output, "
                                 "or --overwrite to start over")
            if good < self.path.stat().st_size:
                with open(self.path, "r+b") as f:  # cut the torn line so that appends start on a fresh line
                    f.truncate(good)
            for record in records:
                self._add(record)
            _logger.info("resuming %s: %d layer(s) done", self.path, len(self.layers))
        else:
            atomic_write_text(self.path, json.dumps(header, sort_keys=True) + "\n")

    def _add(self, record: dict[str, Any]) -> None:
        if record.get("type") == "layer":
            self.layers[record["name"]] = record
        elif record.get("type") == "baseline":
            self.baselines[record["name"]] = record["values"]

    def append(self, record: dict[str, Any]) -> None:
        """Add one record durably: written, flushed and fsync'ed before returning."""
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._add(record)


class MemoryProgress:
    """ProgressFile's interface without a file (benchmarks, library use)."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, Any]] = {}
        self.baselines: dict[str, dict[str, float]] = {}

    def append(self, record: dict[str, Any]) -> None:
        if record["type"] == "layer":
            self.layers[record["name"]] = record
        else:
            self.baselines[record["name"]] = record["values"]



def merge_shards(output: str | Path, method: str, model: dict[str, Any] | None = None,
                 direction: str = "single") -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict]:
    """Join ``progress_<method>[_revert].shardKofN.jsonl`` files: (header, layer records, baselines).

    Raises:
        InputError: no shard files, headers that disagree (or name another ``model``), a missing shard, or layers
            missing / analysed twice.
    """
    output, name = Path(output), ranking_name(method, direction)
    pattern = re.compile(rf"progress_{re.escape(name)}\.shard(\d+)of(\d+)\.jsonl$")
    files = sorted((p for p in output.glob(f"progress_{name}.shard*of*.jsonl") if pattern.search(p.name)),
                   key=lambda p: tuple(int(g) for g in pattern.search(p.name).groups()))
    if not files:
        raise InputError(f"no shard progress files progress_{name}.shardKofN.jsonl in {output}: run the shards "
                         "with --shard K/N first")
    reference, records, baselines, seen = None, {}, {}, {}
    for path in files:
        header, lines, _ = read_progress(path)
        if reference is None:
            reference = header
        problem = _mismatch(header, reference, [f for f in _HEADER_FIELDS if f != "shard"])
        if problem or not header.get("shard") or header["shard"][1] != reference["shard"][1]:
            raise InputError(f"cannot merge {path.name} with {files[0].name}: written for "
                             f"{problem or 'another shard count'}")
        if model is not None and header["model"] != model:
            raise InputError(f"{path} was written for another model ({_short(header['model'])}); pass the same "
                             "--weights as the shards")
        seen[header["shard"][0]] = path
        for record in lines:
            if record.get("type") == "layer":
                if record["name"] in records:
                    raise InputError(f"layer {record['name']} was analysed by two shards ({path.name}); remove the "
                                     "duplicate shard file")
                records[record["name"]] = record
            elif record.get("type") == "baseline":
                baselines[record["name"]] = record["values"]
    count = reference["shard"][1]
    missing_shards = [k for k in range(count) if k not in seen]
    if missing_shards:
        raise InputError(f"shard(s) {', '.join(f'{k}/{count}' for k in missing_shards)} missing in {output}: run "
                         "them (with --resume if they started) before --merge")
    names = [info["name"] for info in reference["layers"]]
    missing = [n for n in names if n not in records]
    if missing:
        owners = sorted({names.index(n) % count for n in missing})
        raise InputError(f"{len(missing)} layer(s) not analysed yet (e.g. {missing[0]}) by shard(s) "
                         f"{', '.join(f'{k}/{count}' for k in owners)}: finish them with --resume, then --merge")
    extra = sorted(set(records) - set(names))
    if extra:
        raise InputError(f"shard files hold layers not in the analysis ({extra[:3]}): remove the stray files")
    header = {**reference, "shard": None}
    return header, {n: records[n] for n in names}, baselines
