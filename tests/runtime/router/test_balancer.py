"""The balancer's outlier ejection, on an injected clock: thresholds, back-off, probes, fail-fast."""

from __future__ import annotations

import asyncio
from dataclasses import astuple, replace

import pytest

from captionfleet.runtime.router.balancer import Balancer, NoLiveEndpoint, OutlierPolicy
from captionfleet.runtime.router.errors import error_kind
from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.settings.router import RouterSettings

A, B, C = "http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"
V = Version("v1", 100, "stable", (A, B, C))
POLICY = OutlierPolicy.from_settings(RouterSettings())
"""The defaults, which the tests below count with: out after one refused connection, two timeouts in a
row of requests that had at least 1 s of budget, or three answers in a row that could not be relayed;
out 2 s, doubling up to 60 s; a probe gets 1 s."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_defaults_are_the_settings() -> None:
    defaults = RouterSettings()
    assert Balancer().policy == POLICY
    assert astuple(POLICY) == (1, 2, 3, 1.0, 2.0, 60.0, 1.0)  # the numbers POLICY's docstring gives
    assert not any("outlier" in p for p in defaults.check())
    bad = RouterSettings(outlier_base_ejection_s=0, outlier_timeouts=-1, outlier_max_ejection_s=0)
    problems = bad.check()
    assert any("outlier_base_ejection_s must be > 0" in p for p in problems)
    assert any("outlier_timeouts must be >= 0" in p for p in problems)


def test_round_robin_skips_an_endpoint_that_refused_a_connection() -> None:
    clock = Clock()
    balancer = Balancer(POLICY, clock=clock)
    assert [balancer.choose(V) for _ in range(3)] == [A, B, C]
    balancer.connect_failed(B)
    assert balancer.live_endpoints(V) == [A, C] and balancer.ejected_endpoints() == [B]
    assert {balancer.choose(V) for _ in range(6)} == {A, C}
    assert balancer.counts.ejections == {"connect": 1, "timeout": 0, "bad_response": 0}
    # A retry after B failed takes the next live endpoint in the version's order.
    assert balancer.choose(V, avoid=B) == C and balancer.choose(V, avoid=C) == A


def test_timeouts_eject_only_in_a_row_and_only_with_a_real_budget() -> None:
    balancer = Balancer(POLICY, clock=Clock())
    balancer.timed_out(A, budget_s=30.0)
    assert balancer.live_endpoints(V) == [A, B, C]  # one may be a slow batch
    balancer.succeeded(A)  # an answer in between: the count starts again
    balancer.timed_out(A, budget_s=30.0)
    assert A in balancer.live_endpoints(V)
    for _ in range(5):
        balancer.timed_out(A, budget_s=0.15)  # a client's short deadline: not the endpoint's fault
    assert A in balancer.live_endpoints(V)
    balancer.timed_out(A, budget_s=30.0)
    assert balancer.live_endpoints(V) == [B, C]
    assert balancer.counts.ejections == {"connect": 0, "timeout": 1, "bad_response": 0}


def test_bad_answers_eject_only_in_a_row() -> None:
    balancer = Balancer(POLICY, clock=Clock())
    for _ in range(2):
        balancer.bad_response(A)
    balancer.succeeded(A)  # a good answer in between: the count starts again
    balancer.bad_response(A)
    balancer.bad_response(A)
    assert balancer.live_endpoints(V) == [A, B, C]
    balancer.bad_response(A)
    assert balancer.live_endpoints(V) == [B, C]
    assert balancer.counts.ejections == {"connect": 0, "timeout": 0, "bad_response": 1}


def test_a_bad_answer_is_still_an_answer_for_the_other_counts() -> None:
    balancer = Balancer(POLICY, clock=Clock())
    balancer.timed_out(A, budget_s=30.0)
    balancer.bad_response(A)  # it answered: the timeouts in a row end
    balancer.timed_out(A, budget_s=30.0)
    assert balancer.live_endpoints(V) == [A, B, C]


def test_zero_thresholds_never_eject() -> None:
    balancer = Balancer(replace(POLICY, connect_failures=0, timeouts=0, bad_responses=0), clock=Clock())
    for _ in range(10):
        balancer.connect_failed(A)
        balancer.timed_out(A, budget_s=30.0)
        balancer.bad_response(A)
    assert balancer.live_endpoints(V) == [A, B, C]


def test_all_ejected_fails_fast_with_retry_after_until_the_next_probe() -> None:
    clock = Clock()
    balancer = Balancer(POLICY, clock=clock)
    for endpoint in V.endpoints:
        balancer.connect_failed(endpoint)
    with pytest.raises(NoLiveEndpoint) as caught:
        balancer.choose(V)
    error = caught.value
    assert error.retry_after == pytest.approx(POLICY.base_ejection_s + POLICY.probe_timeout_s)
    assert error.status == 503 and error.code == "no_route"
    assert error_kind(error) == "connect_failures"  # the version's fault in its figures
    # A retry still goes somewhere: to the address that just failed (with one endpoint, a Service).
    assert balancer.choose(V, avoid=A) == A


def test_failed_probes_double_the_ejection_time_up_to_the_cap() -> None:
    clock = Clock()
    balancer = Balancer(replace(POLICY, max_ejection_s=10.0), clock=clock, probe=_never_called)
    balancer.connect_failed(A)
    waits = []
    for _ in range(5):
        health = balancer._health[A]
        assert health.out_until is not None
        waits.append(health.out_until - clock.now)
        clock.now = health.out_until
        balancer.probed(A, ready=False)
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert balancer.counts.probe_failures == 5 and balancer.counts.ejections["connect"] == 1
    balancer.probed(A, ready=True)
    assert A in balancer.live_endpoints(V) and balancer.counts.returns == 1


def test_the_back_off_is_forgotten_after_staying_in_for_the_longest_ejection() -> None:
    clock = Clock()
    balancer = Balancer(replace(POLICY, max_ejection_s=10.0), clock=clock, probe=_never_called)

    def eject_and_return() -> float:
        balancer.connect_failed(A)
        out_until = balancer._health[A].out_until
        assert out_until is not None
        balancer.probed(A, ready=True)
        return out_until - clock.now

    assert eject_and_return() == 2.0
    clock.now += 5  # back, but not for long: the next ejection is longer
    assert eject_and_return() == 4.0
    clock.now += 10  # stayed in for max_ejection_s
    assert eject_and_return() == 2.0


def test_without_a_probe_an_endpoint_comes_back_when_its_time_is_up() -> None:
    clock = Clock()
    single = Version("v1", 100, "stable", (A,))
    balancer = Balancer(POLICY, clock=clock)  # no probe and no event loop: never out for ever
    balancer.connect_failed(A)
    with pytest.raises(NoLiveEndpoint):
        balancer.choose(single)
    clock.now += 1.9
    assert balancer.live_endpoints(single) == []
    clock.now += 0.2
    assert balancer.choose(single) == A and balancer.counts.returns == 1


def test_an_answer_from_an_ejected_endpoint_brings_it_back() -> None:
    balancer = Balancer(POLICY, clock=Clock(), probe=_never_called)
    balancer.connect_failed(A)
    balancer.succeeded(A)  # e.g. the retry to the same Service address reached another pod
    assert A in balancer.live_endpoints(V)


def test_endpoints_that_leave_the_table_are_forgotten() -> None:
    balancer = Balancer(POLICY, clock=Clock())
    balancer.connect_failed(A)
    balancer.connect_failed(B)
    balancer.table_changed(RoutingTable((Version("v1", 100, "stable", (B, C)),)))
    assert balancer.ejected_endpoints() == [B]


async def test_a_background_probe_brings_an_endpoint_back() -> None:
    answers = [False, False, True]
    asked: list[str] = []
    probed = asyncio.Event()

    async def probe(endpoint: str) -> bool:
        asked.append(endpoint)
        probed.set()
        return answers.pop(0)

    fast = replace(POLICY, base_ejection_s=0.01, max_ejection_s=0.05)
    balancer = Balancer(fast, probe=probe)  # the real clock, with the real event loop's sleeps
    single = Version("v1", 100, "stable", (A,))
    try:
        balancer.connect_failed(A)
        assert balancer.live_endpoints(single) == []
        async with asyncio.timeout(10):
            while balancer.live_endpoints(single) != [A]:
                await probed.wait()
                probed.clear()
        assert asked == [A, A, A] and balancer.counts.probe_failures == 2 and balancer.counts.returns == 1
    finally:
        await balancer.close()


async def _never_called(endpoint: str) -> bool:
    raise AssertionError("no probe runs without an event loop turn")
