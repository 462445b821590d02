"""The batch cost model: a line through measured batch times, recent batches weighing most."""

from __future__ import annotations

import pytest

from captionfleet.runtime.serving.batch_cost import BatchCost


def test_nothing_is_known_before_the_first_batch() -> None:
    cost = BatchCost()
    assert not cost.known
    assert cost.per_item_s() == 0.0 and cost.predict_s(8) == 0.0


def test_the_fitted_line_gives_an_items_cost_and_a_batchs_time() -> None:
    cost = BatchCost()
    for size in (1, 8, 2, 32, 4, 16) * 5:
        cost.observe(size, 0.05 + 0.02 * size)
    assert cost.per_item_s() == pytest.approx(0.02)
    assert cost.predict_s(10) == pytest.approx(0.25)


def test_one_size_only_counts_the_whole_time_per_item() -> None:
    # No spread of sizes, no slope: the dearest an item can be (the batch's time has no fixed part).
    cost = BatchCost()
    for _ in range(10):
        cost.observe(8, 0.4)
    assert cost.per_item_s() == pytest.approx(0.05)
    assert cost.predict_s(8) == pytest.approx(0.4)


def test_a_flat_line_makes_items_free() -> None:
    cost = BatchCost()
    for size in (1, 32, 8, 16) * 3:
        cost.observe(size, 0.03)
    assert cost.per_item_s() == pytest.approx(0.0, abs=1e-12)
    assert cost.predict_s(4) == pytest.approx(0.03)


def test_a_machine_that_gets_slower_is_followed() -> None:
    cost = BatchCost()
    for size in (2, 8) * 50:
        cost.observe(size, 0.01 * size)
    for size in (2, 8) * 50:
        cost.observe(size, 0.03 * size)  # other work now shares the CPUs
    assert cost.per_item_s() == pytest.approx(0.03, rel=0.05)


def test_nonsense_times_are_ignored() -> None:
    cost = BatchCost()
    cost.observe(0, 1.0)
    cost.observe(4, float("nan"))
    cost.observe(4, -1.0)
    assert not cost.known
