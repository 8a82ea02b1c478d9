"""Tests for utils/inference/output_error.py (and the proxies' values from it, utils/sensitivity/metrics.py): SQNR /
cosine / MSE and the head's box and score parts equal hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from utils.inference.output_error import (
    MSE_CAP,
    SQNR_CAP_DB,
    DetectionError,
    Moments,
    combine,
    cosine_similarity,
    head_parts,
    mse,
    sqnr_db,
)
from utils.sensitivity.metrics import detection_values

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_equal_hand_computation():
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    noise = torch.tensor([0.1, -0.1, 0.1, -0.1], dtype=torch.float64)
    test = ref + noise
    assert sqnr_db(ref, test) == pytest.approx(10 * math.log10(30 / 0.04))
    dot, n1, n2 = float((ref * test).sum()), float(ref.norm()), float(test.norm())
    assert cosine_similarity(ref, test) == pytest.approx(dot / (n1 * n2))
    assert mse(ref, test) == pytest.approx(0.01)
    weight = torch.tensor([1.0, 0.0, 0.0, 3.0])
    assert sqnr_db(ref, test, weight) == pytest.approx(10 * math.log10((1 + 48) / (0.01 + 0.03)))
    assert mse(ref, test, weight) == pytest.approx(0.04 / 4)
    assert cosine_similarity(ref, -ref) == pytest.approx(-1.0)
    # finite everywhere: no error, zero signal, non-finite outputs
    assert sqnr_db(ref, ref) == SQNR_CAP_DB and mse(ref, ref) == 0.0
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -SQNR_CAP_DB
    assert cosine_similarity(torch.zeros(3), torch.zeros(3)) == 1.0
    bad = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    values = [sqnr_db(ref, bad), cosine_similarity(ref, bad), mse(ref, bad)]
    assert values == [-SQNR_CAP_DB, -1.0, MSE_CAP] and all(math.isfinite(v) for v in values)
    # batches accumulate to the same numbers as one call
    moments = Moments().update(ref[:2], test[:2]).update(ref[2:], test[2:])
    assert moments.sqnr_db == pytest.approx(sqnr_db(ref, test))
    # parts combine by mean noise-to-signal ratio
    a, b = Moments().update(ref, test), Moments().update(ref, ref + 2 * noise)
    nsr = (0.04 / 30 + 0.16 / 30) / 2
    assert combine("sqnr", [a, b]) == pytest.approx(-10 * math.log10(nsr))


def test_head_parts_normalise_boxes_and_weight_by_score():
    # one anchor: a 20x10 box at (100, 50), scores 0.5 / 0.2; the test box is shifted by 2 px in x
    ref = torch.tensor([[[100.0, 50.0, 20.0, 10.0, 1.0, 0.5, 0.2]]])
    test = ref.clone()
    test[..., 0] += 2.0
    (box_ref, box_test, weight), (score_ref, score_test) = head_parts(ref, test)
    size = math.sqrt(200.0)
    assert torch.allclose(box_ref, torch.tensor([-10.0, -5.0, 10.0, 5.0]) / size)
    assert torch.allclose(box_test - box_ref, torch.tensor([2.0, 0.0, 2.0, 0.0]) / size)
    assert weight.item() == pytest.approx(0.5) and torch.equal(score_ref, score_test)
    error = DetectionError().update(ref, test)
    values = detection_values(error, "sqnr")
    assert values["sqnr_db_score"] == SQNR_CAP_DB
    assert values["sqnr_db_box"] == pytest.approx(10 * math.log10(250 / 8))
    assert values["sqnr_db"] == pytest.approx(-10 * math.log10((8 / 250) / 2), rel=1e-6)
