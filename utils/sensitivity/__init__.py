"""Per-layer quantization sensitivity of a calibrated YOLOv6 model.

Every quantized layer is quantized alone (all others in float; direction ``single``) or returned alone to float
(all others INT8; ``revert``) and scored by a probe (``probes``): ``map`` (COCO
mAP50 / mAP50:95 on labelled images, as YOLOv6's ``tools/partial_quantization`` measures it) or a label-free proxy,
``sqnr`` / ``cosine`` / ``mse`` (``metrics``), sped up by reusing float sub-module outputs (``reuse``). ``analyse``
appends each result to a progress store (``store``: resume, shards, merge) as soon as it is known; ``report``
writes the rankings and reads them back; ``agreement`` compares two rankings.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils.sensitivity.metrics import COLUMNS, VALUE_FORMAT, ranking_name
from utils.sensitivity.store import MemoryProgress, ProgressFile

_logger = logging.getLogger(__name__)

def _summary(values: dict[str, float], method: str) -> str:
    return " ".join(f"{col} {VALUE_FORMAT[method].format(values[col])}" for col in COLUMNS[method])


def analyse(probe: Callable[[str], dict[str, float]], layers: Sequence[str], progress: ProgressFile | MemoryProgress,
            *, method: str, direction: str = "single", baselines: bool = True,
            on_layer: Callable[[str, dict[str, Any]], None] | None = None,
            show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """Probe every layer not yet in ``progress`` (in order), appending each result as soon as it is known.

    Args:
        probe: layer name -> metric values (``MapProbe`` / ``ProxyProbe``); with ``baselines`` its ``baselines()``
            is also run once (results stored as baseline records).
        on_layer: called after each layer's record is on disk (name, record).

    Returns:
        Layer name -> record, for ``layers`` (finished earlier or now).
    """
    if baselines and not progress.baselines and hasattr(probe, "baselines"):
        for name, values in probe.baselines().items():
            progress.append({"type": "baseline", "name": name, "values": values})
            _logger.info("baseline %s: %s", name, _summary(values, method))
    todo = [name for name in layers if name not in progress.layers]
    index = {name: i for i, name in enumerate(layers)}
    with logging_redirect_tqdm(), tqdm(total=len(layers), initial=len(layers) - len(todo), unit="layer",
                                       desc=f"sensitivity [{ranking_name(method, direction)}]", file=sys.stderr,
                                       disable=not show_progress,
                                       dynamic_ncols=True) as bar:
        for name in todo:
            start = time.perf_counter()
            values = probe(name)
            record = {"type": "layer", "name": name, "index": index[name], "values": values,
                      "seconds": round(time.perf_counter() - start, 4)}
            progress.append(record)
            _logger.debug("%s: %s (%.2f s)", name, _summary(values, method), record["seconds"])
            bar.update(1)
            if on_layer is not None:
                on_layer(name, record)
    return {name: progress.layers[name] for name in layers}
