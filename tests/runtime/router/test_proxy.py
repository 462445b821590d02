"""The router over real HTTP, in front of fake runtimes on loopback: weights, stickiness, retries,
deadlines, limits and the error bodies."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from captionfleet.runtime.router.app import ROUTER
from captionfleet.runtime.router.table import RoutingTable, Version, bucket_of

ERROR_KEYS = {"error", "request_id"}


def assert_error(body: Any, code: str) -> None:
    assert set(body) == ERROR_KEYS and body["error"]["code"] == code and body["error"]["message"], body


async def test_requests_without_a_user_are_spread_by_weight(start_runtime: Any, start_router: Any) -> None:
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    router = await start_router(
        routes=(f"v1={v1.url}", f"v2={v2.url}"), weights=("v1=80", "v2=20"), canary="v2"
    )
    answered: Counter[str] = Counter()
    for _ in range(400):
        response = await router.caption()
        body = await response.json()
        assert response.status == 200
        assert body["model_version"] == response.headers["X-Routed-Version"]  # who answered, said twice
        answered[body["model_version"]] += 1
    # Binomial(400, 0.2): mean 80, sd 8; the seeded generator makes this deterministic anyway.
    assert 50 <= answered["v2"] <= 110, answered
    assert len(v1.received) == answered["v1"] and len(v2.received) == answered["v2"]


async def test_users_stick_and_a_growing_canary_only_takes_users(
    start_runtime: Any, start_router: Any
) -> None:
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    router = await start_router(
        routes=(f"v1={v1.url}", f"v2={v2.url}"), weights=("v1=90", "v2=10"), canary="v2"
    )
    users = [f"user-{i}" for i in range(120)]

    async def versions() -> dict[str, str]:
        seen = {}
        for user in users:
            for _ in range(2):
                response = await router.caption(headers={"X-User-Id": user, "Content-Type": "image/png"})
                version = (await response.json())["model_version"]
                assert seen.setdefault(user, version) == version, f"{user} moved while the table stayed"
        return seen

    before = await versions()
    assert before == {u: "v2" if bucket_of(u) < 1000 else "v1" for u in users}
    grown = RoutingTable(
        (Version("v1", 60, "stable", (v1.url,)), Version("v2", 40, "canary", (v2.url,))), "test"
    )
    router.holder.publish(grown)
    after = await versions()
    moved = {u for u in users if before[u] != after[u]}
    assert moved == {u for u in users if 1000 <= bucket_of(u) < 4000}
    assert all(after[u] == "v2" for u in moved)


async def test_a_connection_failure_is_retried_once_on_another_endpoint(
    start_runtime: Any, start_router: Any, dead_url: str
) -> None:
    live = await start_runtime("v1")
    router = await start_router(routes=(f"v1={dead_url}", f"v1={live.url}"))
    for _ in range(4):
        response = await router.caption()
        assert response.status == 200
    assert len(live.received) == 4
    figures = await router.figures("v1")
    # One retry: after refusing a connection, the dead endpoint sits out while the others take turns.
    assert figures["requests"] == 4 and figures["errors"] == 0 and figures["retries"] == 1


async def test_a_503_is_retried_elsewhere_with_the_same_request_id(
    start_runtime: Any, start_router: Any
) -> None:
    busy, idle = await start_runtime("v1"), await start_runtime("v1")
    busy.statuses = [503, 503]
    router = await start_router(routes=(f"v1={busy.url}", f"v1={idle.url}"))
    response = await router.caption(headers={"X-Request-Id": "req-42", "Content-Type": "image/png"})
    assert response.status == 200 and response.headers["X-Request-Id"] == "req-42"
    assert (await response.json())["request_id"] == "req-42"
    assert busy.received[0].headers["X-Request-Id"] == idle.received[0].headers["X-Request-Id"] == "req-42"
    # Without an id from the client, the generated one is the same on both attempts too. Round robin
    # sends this one to `idle` first, which is busy now.
    busy.statuses, idle.statuses = [], [503]
    response = await router.caption()
    generated = response.headers["X-Request-Id"]
    assert response.status == 200 and len(generated) == 32
    assert idle.received[-1].headers["X-Request-Id"] == busy.received[-1].headers["X-Request-Id"] == generated
    assert len(busy.received) == len(idle.received) == 2


async def test_the_second_503_is_relayed_and_counted(start_runtime: Any, start_router: Any) -> None:
    a, b = await start_runtime("v1"), await start_runtime("v1")
    a.statuses, b.statuses = [503], [503]
    router = await start_router(routes=(f"v1={a.url}", f"v1={b.url}"))
    response = await router.caption()
    assert response.status == 503 and response.headers["Retry-After"] == "2"
    assert_error(await response.json(), "fake_503")  # the runtime's own body, unchanged
    figures = await router.figures("v1", "window")
    assert figures["status_5xx"] == 1 and figures["errors"] == 1 and figures["retries"] == 1


async def test_4xx_and_500_are_not_retried_and_only_5xx_are_errors(
    start_runtime: Any, start_router: Any
) -> None:
    a, b = await start_runtime("v1"), await start_runtime("v1")
    router = await start_router(routes=(f"v1={a.url}", f"v1={b.url}"), retry=True)
    a.statuses, b.statuses = [429, 500], [400]
    statuses = [(await router.caption()).status for _ in range(3)]
    assert statuses == [429, 400, 500]
    assert len(a.received) == 2 and len(b.received) == 1  # no second attempts
    figures = await router.figures("v1")
    assert figures["requests"] == 3 and figures["errors"] == 1 and figures["status_5xx"] == 1
    assert figures["retries"] == 0


async def test_unreachable_after_the_retry_is_a_502(start_router: Any, dead_url: str) -> None:
    router = await start_router(routes=(f"v1={dead_url}",))
    response = await router.caption(headers={"X-Request-Id": "abc", "Content-Type": "image/png"})
    assert response.status == 502 and response.headers["X-Routed-Version"] == "v1"
    assert response.headers["Retry-After"] == "1"  # every 502/503 says when to come back
    body = await response.json()
    assert_error(body, "upstream_unreachable")
    assert body["request_id"] == "abc" and "127.0.0.1" not in body["error"]["message"]  # no internals
    figures = await router.figures("v1")
    assert figures["connect_failures"] == 1
    assert figures["retries"] == 1
    # With retries off, one attempt only.
    quiet = await start_router(routes=(f"v1={dead_url}",), retry=False)
    assert (await quiet.caption()).status == 502
    figures = await quiet.figures("v1")
    assert figures["retries"] == 0


async def test_the_deadline_is_passed_on_and_enforced(start_runtime: Any, start_router: Any) -> None:
    runtime = await start_runtime("v1")
    router = await start_router(routes=(f"v1={runtime.url}",), request_timeout_ms=3000)
    await router.caption()
    assert 2000 < int(runtime.received[-1].headers["X-Request-Timeout-Ms"]) <= 3000
    await router.caption(headers={"X-Request-Timeout-Ms": "1500", "Content-Type": "image/png"})
    assert 500 < int(runtime.received[-1].headers["X-Request-Timeout-Ms"]) <= 1500

    runtime.hang = True
    response = await router.caption(headers={"X-Request-Timeout-Ms": "150", "Content-Type": "image/png"})
    assert response.status == 504
    assert_error(await response.json(), "deadline_exceeded")
    assert 0 < int(runtime.received[-1].headers["X-Request-Timeout-Ms"]) <= 150
    figures = await router.figures("v1")
    assert figures["timeouts"] == 1
    assert figures["retries"] == 0  # a spent budget is not retried

    for bad in ("0", "-5", "soon", "nan", "inf"):
        response = await router.caption(headers={"X-Request-Timeout-Ms": bad, "Content-Type": "image/png"})
        assert response.status == 400
        assert_error(await response.json(), "invalid_timeout")


async def test_request_and_answer_pass_through_unchanged(start_runtime: Any, start_router: Any) -> None:
    runtime = await start_runtime("v1")
    router = await start_router(routes=(f"v1={runtime.url}",))
    payload = b'{"images": [{"url": "https://example.com/cat.png"}], "suggestions": 3}'
    async with router.client.post(
        router.url + "/v1/caption/batch?style=concise&num_beams=2",
        data=payload,
        headers={
            "Content-Type": "application/json",
            "X-API-Key": "k",
            "X-User-Id": "u1",
            "Connection": "close",
        },
    ) as response:
        assert response.status == 200
        assert response.headers["X-Fake-Runtime"] == runtime.url  # the runtime's own headers are relayed
        assert (await response.json())["echo_bytes"] == len(payload)
    received = runtime.received[-1]
    assert received.path_qs == "/v1/caption/batch?style=concise&num_beams=2" and received.body == payload
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["X-API-Key"] == "k" and received.headers["X-User-Id"] == "u1"
    assert received.headers["X-Forwarded-For"] == "127.0.0.1"
    assert received.headers.get("Connection", "keep-alive").lower() != "close"  # hop-by-hop: not forwarded


async def test_body_limit(start_runtime: Any, start_router: Any) -> None:
    runtime = await start_runtime("v1")
    router = await start_router(routes=(f"v1={runtime.url}",), max_body_bytes=1000)
    assert (await router.caption(data=b"x" * 1000)).status == 200
    response = await router.caption(data=b"x" * 1001)
    assert response.status == 413
    assert_error(await response.json(), "payload_too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while streaming
        for _ in range(10):
            yield b"y" * 300

    response = await router.caption(data=chunked())
    assert response.status == 413
    assert len(runtime.received) == 1


async def test_api_keys_are_checked_at_the_edge(start_runtime: Any, start_router: Any) -> None:
    runtime = await start_runtime("v1")
    router = await start_router(routes=(f"v1={runtime.url}",), api_keys=("s3cret",))
    response = await router.caption()
    assert response.status == 401
    assert_error(await response.json(), "unauthorized")
    assert not runtime.received
    response = await router.caption(headers={"X-API-Key": "s3cret", "Content-Type": "image/png"})
    assert response.status == 200 and runtime.received[-1].headers["X-API-Key"] == "s3cret"


async def test_the_operators_reads_need_no_key(start_runtime: Any, start_router: Any) -> None:
    """The analysis, shadow checks, demand poll and cascade figures read these without a key (the
    operator holds none of the users' keys), so they work with spec.auth."""
    runtime = await start_runtime("v1")
    router = await start_router(routes=(f"v1={runtime.url}",), api_keys=("s3cret",))
    for path in ("/v1/router/stats", "/v1/models"):
        status, body = await router.get_json(path)
        assert status == 200, (path, body)
    assert (await router.caption()).status == 401


async def test_no_routable_version(start_runtime: Any, start_router: Any) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",))
    router.holder.publish(RoutingTable((Version("v1", 100, "stable", ()),), "test"))
    response = await router.caption()
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert_error(await response.json(), "no_route")
    status, body = await router.get_json("/readyz")
    assert status == 503 and body["ready"] is False and "can take traffic" in body["reason"]
    _, stats = await router.get_json("/v1/router/stats")
    assert stats["unrouted"]["total"] == 1


async def test_users_of_a_version_without_endpoints_go_elsewhere(
    start_runtime: Any, start_router: Any
) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",))
    router.holder.publish(
        RoutingTable((Version("v1", 50, "stable", (v1.url,)), Version("v2", 50, "canary", ())), "test")
    )
    users = [f"u{i}" for i in range(40)]
    for user in users:
        response = await router.caption(headers={"X-User-Id": user, "Content-Type": "image/png"})
        assert (await response.json())["model_version"] == "v1"
    _, stats = await router.get_json("/v1/router/stats")
    meant_for_v2 = sum(1 for u in users if bucket_of(u) < 5000)
    assert stats["versions"]["v2"]["total"]["fallbacks"] == meant_for_v2 > 0
    assert stats["versions"]["v2"]["total"]["requests"] == 0


async def test_operational_endpoints(start_runtime: Any, start_router: Any) -> None:
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    router = await start_router(
        routes=(f"v1={v1.url}", f"v2={v2.url}"), weights=("v1=70", "v2=30"), canary="v2"
    )
    await router.caption()
    assert await router.get_json("/healthz") == (200, {"status": "ok"})
    assert await router.get_json("/readyz") == (200, {"ready": True, "versions": ["v1", "v2"]})
    status, models = await router.get_json("/v1/models")
    assert status == 200 and models["ready"] is True and models["router"]["source"] == "static options"
    common = {"endpoints": 1, "ready": True, "cold_start": False}
    assert models["models"] == [
        {"version": "v1", "role": "stable", "weight": 70, "buckets": [3000, 10000], **common},
        {"version": "v2", "role": "canary", "weight": 30, "buckets": [0, 3000], **common},
    ]
    async with router.client.get(router.url + "/metrics") as response:
        text = await response.text()
    assert response.headers["Content-Type"].startswith("text/plain")
    version = "v1" if v1.received else "v2"
    assert f'captionfleet_router_requests_total{{code="200",version="{version}"}} 1.0' in text
    assert 'captionfleet_router_version_weight{role="canary",version="v2"} 30.0' in text
    assert "captionfleet_router_ready 1.0" in text

    status, stats = await router.get_json("/v1/router/stats?window=30&seconds=true")
    assert status == 200 and stats["window_s"] == 30 and set(stats["versions"]) == {"v1", "v2"}
    assert sum(s["requests"] for s in stats["versions"][version]["seconds"]) == 1
    for bad in ("0", "x"):
        status, body = await router.get_json(f"/v1/router/stats?window={bad}")
        assert status == 400
        assert_error(body, "invalid_window")

    status, body = await router.get_json("/nope")
    assert status == 404
    assert_error(body, "not_found")
    status, body = await router.get_json("/v1/caption")
    assert status == 405
    assert_error(body, "method_not_allowed")

    status, document = await router.get_json("/openapi.json")
    assert status == 200 and document["info"]["title"] == "captionfleet router"
    assert {"/v1/caption", "/v1/router/stats"} <= set(document["paths"])

    router.app[ROUTER].start_draining()
    assert await router.get_json("/readyz") == (503, {"ready": False, "reason": "draining"})
