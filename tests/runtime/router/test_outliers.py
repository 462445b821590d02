"""Outlier ejection over real HTTP: a hung pod (accepts, never answers) next to a healthy runtime, a
refusing one, and a sick runtime that comes back once its /readyz does."""

from __future__ import annotations

import time
from typing import Any

from captionfleet.runtime.router.app import ROUTER

ERROR_KEYS = {"error", "request_id"}


async def test_a_hung_endpoint_is_ejected_and_later_requests_go_to_the_healthy_one(
    start_runtime: Any, start_router: Any, hung_url: str
) -> None:
    healthy = await start_runtime("v1")
    # 1.5 s budgets: over outlier_timeout_min_budget_ms (1 s), so the timeouts count; defaults otherwise.
    router = await start_router(routes=(f"v1={hung_url}", f"v1={healthy.url}"), request_timeout_ms=1500)
    balancer = router.app[ROUTER].balancer
    version = router.holder.table.versions[0]
    timeouts = 0
    for _ in range(4):  # round robin: every other request meets the hung pod until it is ejected
        before = len(healthy.received)
        started = time.monotonic()
        response = await router.caption()
        if response.status == 504:
            timeouts += 1
            assert time.monotonic() - started >= 1.4  # it waited its budget, once:
            assert len(healthy.received) == before  # not retried into a second wait elsewhere
            assert (await response.json())["error"]["code"] == "deadline_exceeded"
        else:
            assert response.status == 200
    assert timeouts == 2  # outlier_timeouts
    assert balancer.live_endpoints(version) == [healthy.url]
    assert balancer.ejected_endpoints() == [hung_url]
    assert balancer.counts.ejections == {"connect": 0, "timeout": 1, "bad_response": 0}
    for _ in range(10):
        started = time.monotonic()
        response = await router.caption()
        assert response.status == 200 and time.monotonic() - started < 1.4
    # Its probe (GET /readyz) hangs too, so it stays out: the probe's own time limit fails it.
    assert hung_url not in balancer.live_endpoints(version)
    figures = await router.figures("v1")
    assert figures["timeouts"] == 2 and figures["retries"] == 0 and figures["requests"] == 14


async def test_when_every_endpoint_is_out_requests_fail_fast_with_retry_after(
    start_router: Any, hung_url: str, dead_url: str
) -> None:
    router = await start_router(routes=(f"v1={hung_url}",), request_timeout_ms=1200)
    for _ in range(2):
        assert (await router.caption()).status == 504
    started = time.monotonic()
    response = await router.caption(headers={"X-Request-Id": "r-1", "Content-Type": "image/png"})
    assert time.monotonic() - started < 1.0  # no wait for the hung pod
    assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
    body = await response.json()
    assert set(body) == ERROR_KEYS and body["error"]["code"] == "no_route" and body["request_id"] == "r-1"
    assert response.headers["X-Routed-Version"] == "v1"
    figures = await router.figures("v1")
    assert figures["connect_failures"] == 1  # counted against the version
    status, ready = await router.get_json("/readyz")  # nothing to route to: endpoints move elsewhere
    assert status == 503 and not ready["ready"] and "ejected" in ready["reason"]
    async with router.client.get(router.url + "/metrics") as scraped:
        text = await scraped.text()
    assert 'captionfleet_router_endpoint_ejections_total{cause="timeout"} 1.0' in text
    assert "captionfleet_router_endpoints_ejected 1.0" in text

    # A refused connection ejects at once: the first request is a 502 (retried on the same address),
    # the next one a 503 without trying; both say when to come back.
    refused = await start_router(routes=(f"v1={dead_url}",))
    first, second = await refused.caption(), await refused.caption()
    assert first.status == 502 and first.headers["Retry-After"] == "1"
    assert second.status == 503 and int(second.headers["Retry-After"]) >= 1


async def test_an_ejected_endpoint_comes_back_after_its_readyz_answers(
    start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    sick, healthy = await start_runtime("v1"), await start_runtime("v1")
    sick.hang, sick.ready = True, False
    router = await start_router(
        routes=(f"v1={sick.url}", f"v1={healthy.url}"),
        request_timeout_ms=1200,
        outlier_base_ejection_s=0.2,
        outlier_max_ejection_s=1.0,
        outlier_probe_timeout_ms=500,
    )
    balancer = router.app[ROUTER].balancer
    version = router.holder.table.versions[0]
    statuses = [(await router.caption()).status for _ in range(4)]  # two meet the hung runtime
    assert sorted(statuses) == [200, 200, 504, 504] and balancer.ejected_endpoints() == [sick.url]
    served = len(sick.received)

    async def probed_and_refused() -> bool:
        return sick.probes >= 2 and balancer.counts.probe_failures >= 2

    await eventually(probed_and_refused, timeout_s=20, what="failed probes of the sick runtime")
    assert sick.url not in balancer.live_endpoints(version)
    assert [(await router.caption()).status for _ in range(4)] == [200] * 4
    assert len(sick.received) == served  # no request reached it while it was out

    sick.hang, sick.ready = False, True
    sick.release.set()

    async def back() -> bool:
        return sick.url in balancer.live_endpoints(version)

    await eventually(back, timeout_s=20, what="the sick runtime back in rotation")
    assert balancer.counts.returns == 1
    statuses = [(await router.caption()).status for _ in range(4)]
    assert statuses == [200] * 4 and len(sick.received) == served + 2  # its turns again


async def test_a_connection_dropped_after_the_request_went_out_is_retried_without_ejecting(
    start_runtime: Any, start_router: Any
) -> None:
    # One pod: ejecting it for one dropped connection (a reset, a kept-alive connection it closed)
    # would answer every other request 503 until the retry came back.
    runtime = await start_runtime("v1")
    runtime.statuses = [0]  # the first request's connection is closed without an answer
    router = await start_router(routes=(f"v1={runtime.url}",))
    balancer = router.app[ROUTER].balancer
    first = await router.caption()
    assert first.status == 200 and len(runtime.received) == 2  # retried on the same address
    assert balancer.ejected_endpoints() == [] and balancer.counts.ejections == {
        "connect": 0,
        "timeout": 0,
        "bad_response": 0,
    }
    assert (await router.caption()).status == 200
    figures = await router.figures("v1")
    assert figures["requests"] == 2 and figures["retries"] == 1 and figures["errors"] == 0
