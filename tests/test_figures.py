"""The shadow counts a router writes are the ones the operator reads back (captionfleet/figures.py)."""

from __future__ import annotations

import json

import pytest

from captionfleet.figures import ShadowCounts, quantile
from captionfleet.operator.figures import ShadowFigures as OperatorShadowFigures
from captionfleet.runtime.router.shadow import CopyOutcome, ShadowFigures


def test_what_a_router_writes_the_operator_adds_up_to_the_same_counts() -> None:
    router = ShadowFigures(dropped=2)
    router.record(CopyOutcome("v2", 12.0, exact=True, overlap=1.0))
    router.record(CopyOutcome("v2", 30.0, exact=False, overlap=0.25))
    router.record(CopyOutcome("v2", 900.0, error="timeouts"))
    body = json.loads(json.dumps(router.as_json()))

    summed = OperatorShadowFigures()
    summed.add_json(body)
    summed.add_json(body)  # a second router with the same figures

    assert (summed.copies, summed.errors, summed.dropped, summed.compared, summed.exact) == (6, 2, 4, 4, 2)
    assert summed.overlap_sum == pytest.approx(2.5)
    assert (summed.agreement, summed.token_overlap) == (pytest.approx(0.5), pytest.approx(0.625))
    assert (body["error_rate"], body["agreement"], body["token_overlap"]) == (
        pytest.approx(1 / 3, abs=1e-6),
        0.5,
        0.625,
    )


def test_no_compared_copies_have_no_agreement_and_an_empty_body_adds_nothing() -> None:
    counts = ShadowCounts(copies=3, errors=3)
    counts.add_json({})
    assert (counts.copies, counts.agreement, counts.token_overlap) == (3, None, None)
    assert counts.counts_json()["error_rate"] == 1.0


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ([0, 0, 0], 0.5, None),
        ([10, 0, 0], 0.5, 5.0),  # linear within the first bucket, from 0
        ([0, 10, 0], 0.99, 10.0 + 10.0 * 0.99),
        ([0, 0, 4], 0.5, 20.0),  # above the last bound: its lower edge
    ],
)
def test_quantile_is_linear_within_a_bucket(counts: list[int], q: float, expected: float | None) -> None:
    assert quantile([10.0, 20.0], counts, q) == (None if expected is None else pytest.approx(expected))
