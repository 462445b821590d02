"""Requests held through a cold start (``router/coldstart.py``), over real HTTP with fake runtimes: a
version marked ``cold_start`` with no ready endpoint keeps its requests (and its users) until its
first pod is in the table, within the count, bytes and time bounds, and says so on its figures."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from captionfleet.runtime.router.table import RoutingTable, TableError, Version, bucket_of, from_mapping
from captionfleet.runtime.router.watch import table_from_status


def cold_table(*versions: Version) -> RoutingTable:
    return RoutingTable(versions, "test")


async def held_now(router: Any, version: str) -> int:
    status, stats = await router.get_json("/v1/router/stats")
    assert status == 200
    return int(stats["versions"][version]["held"])


async def send_all(router: Any, count: int, **kwargs: Any) -> list[asyncio.Task[aiohttp.ClientResponse]]:
    return [asyncio.create_task(router.caption(**kwargs)) for _ in range(count)]


async def test_requests_for_a_version_at_zero_are_held_then_answered_by_its_first_pod(
    start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",))
    router.holder.publish(cold_table(Version("v1", 100, "stable", (), cold_start=True)))
    status, ready = await router.get_json("/readyz")
    assert status == 200, ready  # a router with only a cold version still takes (holds) requests
    bodies = [f"image {i}".encode() for i in range(20)]
    tasks = [
        asyncio.create_task(
            router.caption(data=body, headers={"Content-Type": "image/png", "X-Request-Id": f"req-{i}"})
        )
        for i, body in enumerate(bodies)
    ]

    async def all_held() -> bool:
        return await held_now(router, "v1") == 20

    await eventually(all_held, what="20 requests held")
    assert not v1.received and not any(task.done() for task in tasks)
    figures = await router.figures("v1")
    assert figures["cold_starts"] == 1 and figures["cold_start_rejections"] == 0
    assert (await router.scrape())['captionfleet_router_cold_starts_total{version="v1"}'] == 1
    router.holder.publish(cold_table(Version("v1", 100, "stable", (v1.url,), cold_start=True)))
    answers = await asyncio.gather(*tasks)
    assert [answer.status for answer in answers] == [200] * 20
    for i, answer in enumerate(answers):  # each its own answer
        assert (await answer.json())["request_id"] == f"req-{i}"
    assert {r.headers["X-Request-Id"]: r.body for r in v1.received} == {
        f"req-{i}": body for i, body in enumerate(bodies)
    }
    assert await held_now(router, "v1") == 0
    samples = await router.scrape()
    assert samples['captionfleet_router_cold_start_wait_seconds_count{version="v1"}'] == 20
    assert samples['captionfleet_router_held_requests{version="v1"}'] == 0
    assert samples['captionfleet_router_requests_total{code="200",version="v1"}'] == 20


async def test_a_held_user_keeps_its_version_and_others_are_served_meanwhile(
    start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    router = await start_router(routes=(f"v1={v1.url}",))
    router.holder.publish(
        cold_table(Version("v1", 50, "stable", (v1.url,)), Version("v2", 50, "canary", (), cold_start=True))
    )
    users = [f"user-{i}" for i in range(40)]
    canary_users = [u for u in users if bucket_of(u) < 5000]  # the canary's range comes first
    assert 0 < len(canary_users) < len(users)
    tasks = {
        user: asyncio.create_task(router.caption(headers={"X-User-Id": user, "Content-Type": "image/png"}))
        for user in users
    }

    async def canary_users_held() -> bool:
        return await held_now(router, "v2") == len(canary_users)

    await eventually(canary_users_held, what="the canary's users held")
    for user in users:
        if user not in canary_users:
            answer = await tasks[user]
            assert answer.status == 200 and (await answer.json())["model_version"] == "v1"
    assert len(v1.received) == len(users) - len(canary_users)  # no held user went to v1
    figures = await router.figures("v2")
    assert figures["fallbacks"] == 0
    router.holder.publish(
        cold_table(
            Version("v1", 50, "stable", (v1.url,)), Version("v2", 50, "canary", (v2.url,), cold_start=True)
        )
    )
    for user in canary_users:
        answer = await tasks[user]
        assert answer.status == 200 and (await answer.json())["model_version"] == "v2"
    assert len(v2.received) == len(canary_users)


async def test_beyond_max_held_the_excess_gets_503_cold_start_at_once(
    start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",), cold_start_max_held=3)
    router.holder.publish(cold_table(Version("v1", 100, "stable", (), cold_start=True)))
    held = await send_all(router, 3)

    async def three_held() -> bool:
        return await held_now(router, "v1") == 3

    await eventually(three_held, what="3 requests held")
    for _ in range(2):
        refused = await router.caption()
        assert refused.status == 503 and int(refused.headers["Retry-After"]) >= 1
        body = await refused.json()
        assert body["error"]["code"] == "cold_start" and "cold_start_max_held" in body["error"]["message"]
        assert refused.headers["X-Routed-Version"] == "v1"
    assert await held_now(router, "v1") == 3 and not any(task.done() for task in held)
    figures = await router.figures("v1")
    assert figures["cold_start_rejections"] == 2 and figures["errors"] == 0
    samples = await router.scrape()
    assert samples['captionfleet_router_cold_start_rejections_total{reason="count",version="v1"}'] == 2
    router.holder.publish(cold_table(Version("v1", 100, "stable", (v1.url,), cold_start=True)))
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200, 200]


async def test_held_bodies_are_bounded_in_bytes(start_runtime: Any, start_router: Any) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",), cold_start_max_held_bytes=1000)
    router.holder.publish(cold_table(Version("v1", 100, "stable", (), cold_start=True)))
    refused = await router.caption(data=b"x" * 1001, headers={"Content-Type": "image/png"})
    assert refused.status == 503 and "Retry-After" in refused.headers
    body = await refused.json()
    assert body["error"]["code"] == "cold_start" and "cold_start_max_held_bytes" in body["error"]["message"]
    samples = await router.scrape()
    assert samples['captionfleet_router_cold_start_rejections_total{reason="bytes",version="v1"}'] == 1


async def test_a_hold_ends_at_the_cold_start_timeout_or_at_the_request_deadline(
    start_runtime: Any, start_router: Any
) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",), cold_start_timeout_ms=300)
    router.holder.publish(cold_table(Version("v1", 100, "stable", (), cold_start=True)))
    timed_out = await router.caption()
    assert timed_out.status == 503 and int(timed_out.headers["Retry-After"]) >= 1
    assert (await timed_out.json())["error"]["code"] == "cold_start"
    short = await router.caption(headers={"Content-Type": "image/png", "X-Request-Timeout-Ms": "100"})
    assert short.status == 504 and (await short.json())["error"]["code"] == "deadline_exceeded"
    figures = await router.figures("v1")
    # Neither is the version's error: it had no pod to fail; the analysis judges answered requests.
    assert figures["errors"] == 0 and figures["timeouts"] == 0
    assert figures["cold_start_rejections"] == 1 and figures["cold_starts"] == 2
    samples = await router.scrape()
    assert samples['captionfleet_router_cold_start_rejections_total{reason="timeout",version="v1"}'] == 1
    assert not v1.received


async def test_retry_after_estimates_from_the_last_cold_starts(
    start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    """Before any cold start was seen, a refusal says the hold timeout; after a short one, about its
    duration (here well under a second: 1, the least)."""
    v1 = await start_runtime("v1")
    router = await start_router(
        routes=(f"v1={v1.url}",), cold_start_max_held=1, cold_start_timeout_ms=600_000
    )
    cold, warm = (
        cold_table(Version("v1", 100, "stable", endpoints, cold_start=True)) for endpoints in ((), (v1.url,))
    )

    async def one_held() -> bool:
        return await held_now(router, "v1") == 1

    retry_after = []
    for _ in range(2):
        router.holder.publish(cold)
        held = asyncio.create_task(router.caption())
        await eventually(one_held, what="one request held")
        refused = await router.caption()
        assert refused.status == 503 and (await refused.json())["error"]["code"] == "cold_start"
        retry_after.append(int(refused.headers["Retry-After"]))
        router.holder.publish(warm)
        assert (await held).status == 200
    assert retry_after[0] >= 590 and retry_after[1] == 1, retry_after


async def test_a_version_that_leaves_the_table_answers_its_held_requests(
    start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    router = await start_router(routes=(f"v1={v1.url}",))
    router.holder.publish(cold_table(Version("v2", 100, "stable", (), cold_start=True)))
    held = await send_all(router, 2)

    async def two_held() -> bool:
        return await held_now(router, "v2") == 2

    await eventually(two_held, what="2 requests held")
    router.holder.publish(cold_table(Version("v1", 100, "stable", (v1.url,))))
    answers = await asyncio.gather(*held)
    assert [a.status for a in answers] == [503, 503]
    assert [(await a.json())["error"]["code"] for a in answers] == ["no_route", "no_route"]
    assert not v1.received and not v2.received


async def test_last_request_at_is_every_request_routed_to_the_version(
    start_runtime: Any, start_router: Any
) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",))
    _, stats = await router.get_json("/v1/router/stats")
    assert stats["versions"]["v1"]["last_request_at"] is None and stats["versions"]["v1"]["held"] == 0
    before = stats["now"]
    answer = await router.caption(headers={"Content-Type": "image/png", "X-Priority": "bulk"})
    assert answer.status == 200
    _, stats = await router.get_json("/v1/router/stats")
    assert before <= stats["versions"]["v1"]["last_request_at"] <= stats["now"]


def test_cold_start_is_read_from_routes_files_and_the_status() -> None:
    table = from_mapping([{"name": "v1", "weight": 100, "endpoints": [], "cold_start": True}], source="test")
    version = table.versions[0]
    assert version.cold and version.servable and not version.routable and table.routable
    assert table.describe()[0]["cold_start"] is True
    with pytest.raises(TableError, match="cold_start"):
        from_mapping([{"name": "v1", "weight": 100, "cold_start": "yes"}], source="test")
    model = {
        "metadata": {"name": "m"},
        "status": {"versions": [{"name": "v1", "weight": 100, "readyReplicas": 0, "coldStart": True}]},
    }
    (from_status,) = table_from_status(model, {}, namespace="ns", service_port=8080).versions
    assert from_status.cold and not from_status.endpoints
    not_cold = from_mapping([{"name": "v1", "weight": 100, "endpoints": []}], source="test")
    assert not not_cold.routable  # without cold_start: no endpoints, no traffic (today's behaviour)
