"""What a sensitivity method measures: the methods, their columns and direction.

The label-free proxies ``sqnr`` / ``cosine`` / ``mse`` compare a model's outputs with its float outputs
(``utils.inference.output_error``: head boxes and scores, neck levels); the head value ranks, the neck value is a
second, diagnostic column.
"""
from __future__ import annotations

from collections.abc import Sequence

from utils.errors import InputError
from utils.inference.output_error import DetectionError

METHODS = ("map", "sqnr", "cosine", "mse")
PROXY_METHODS = ("sqnr", "cosine", "mse")
# the two text-file columns per method; the second one ranks (as mAP50:95 does in YOLOv6's partial_quant.py)
COLUMNS = {"map": ("mAP50", "mAP50_95"), "sqnr": ("sqnr_db_neck", "sqnr_db"),
           "cosine": ("cosine_neck", "cosine"), "mse": ("mse_neck", "mse")}
# True: a higher value means the layer is *less* sensitive (direction "single": the layer is quantized alone)
HIGHER_IS_LESS_SENSITIVE = {"map": True, "sqnr": True, "cosine": True, "mse": False}
# single: this layer alone INT8, all others float (the seed's, YOLOv6's). revert: this layer alone back to float, all
# others INT8 (leave-one-out, as NNCF's accuracy-aware quantization ranks): sees the interactions of a full-INT8 model.
DIRECTIONS = ("single", "revert")
VALUE_FORMAT = {"map": "{:0.4f}", "sqnr": "{:0.4f}", "cosine": "{:0.8f}", "mse": "{:0.6e}"}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"unknown sensitivity direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    return direction


def key_column(method: str) -> str:
    """The value that ranks layers for ``method``."""
    return COLUMNS[check_method(method)][1]


def higher_is_less_sensitive(method: str, direction: str = "single") -> bool:
    """Whether a higher value means less sensitive. Reverting a sensitive layer *improves* the model, so the
    revert direction reads every metric the other way round."""
    single = HIGHER_IS_LESS_SENSITIVE[check_method(method)]
    return single if check_direction(direction) == "single" else not single


def ranking_name(method: str, direction: str = "single") -> str:
    """The stem of a ranking's files: ``map``, ``sqnr``, ... or ``map_revert``, ``sqnr_revert``, ..."""
    return check_method(method) if check_direction(direction) == "single" else f"{method}_revert"


def sensitivity_order(values: Sequence[float], method: str, direction: str = "single") -> list[int]:
    """Indices from most to least sensitive; ties keep model order."""
    sign = 1.0 if higher_is_less_sensitive(method, direction) else -1.0
    return sorted(range(len(values)), key=lambda i: (sign * values[i], i))




def detection_values(error: DetectionError, method: str) -> dict[str, float]:
    """A proxy's values from an accumulated output error: head (ranks), neck and the head's two parts, keyed as in
    COLUMNS."""
    neck_col, head_col = COLUMNS[method]
    return {head_col: error.head(method), neck_col: error.neck_value(method),
            f"{head_col}_box": error.box.value(method), f"{head_col}_score": error.score.value(method)}
