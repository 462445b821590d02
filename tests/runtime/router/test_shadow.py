"""Shadow traffic through the real router: copies to a canary at weight 0, compared with the primary's
answers; the client's answer untouched; a hung canary costs a bounded number of copies."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from captionfleet.runtime.router.app import ROUTER
from captionfleet.runtime.router.shadow import agreement, parse_caption, token_overlap, words
from captionfleet.runtime.router.table import RoutingTable, Version


async def until(check: Any, within: float = 10.0) -> None:
    """Poll an async ``check`` until it is true, or fail at the deadline."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def shadowed(stable: str, canary: str, mirror: int = 100) -> RoutingTable:
    return RoutingTable(
        (Version("v1", 100, "stable", (stable,)), Version("v2", 0, "canary", (canary,), mirror=mirror)),
        "test",
    )


@pytest.mark.parametrize(
    ("primary", "copy", "exact", "overlap"),
    [
        ("A red circle.", "a red  circle", True, 1.0),
        ("a red circle", "a blue circle", False, 2 / 3),
        ("a red circle above a square", "a red circle", False, 2 * 3 / 9),
        ("", "", True, 1.0),
        ("a red circle", "", False, 0.0),
    ],
)
def test_agreement_is_exact_after_normalisation_and_token_overlap_otherwise(
    primary: str, copy: str, exact: bool, overlap: float
) -> None:
    assert agreement(primary, copy) == (exact, pytest.approx(overlap))
    assert token_overlap(copy, primary) == pytest.approx(overlap)  # symmetric


def test_words_keep_letters_and_digits_of_any_script() -> None:
    assert words("Zwei Kreise, 2 Quadrate — ÜBER") == ["zwei", "kreise", "2", "quadrate", "über"]


def test_caption_answers_are_parsed_only_within_the_limit_and_when_they_are_captions() -> None:
    body = b'{"caption": "a cat", "confidence": 0.5}'
    assert parse_caption(body, 1000) == parse_caption(body, len(body))
    assert parse_caption(body, 1000) is not None and parse_caption(body, 1000).confidence == 0.5  # type: ignore[union-attr]
    assert parse_caption(body, len(body) - 1) is None
    assert parse_caption(b'{"caption": 3}', 1000) is None
    assert parse_caption(b"not json", 1000) is None
    for odd in (b'{"caption": "x", "confidence": true}', b'{"caption": "x", "confidence": 7}'):
        assert parse_caption(odd, 1000) == parse_caption(b'{"caption": "x"}', 1000)


async def test_copies_go_to_the_shadowed_canary_in_the_background_and_are_compared(
    start_runtime: Any, start_router: Any
) -> None:
    stable = await start_runtime("v1")
    agreeing = await start_runtime("v1")  # answers the same caption: agreement 1.0
    router = await start_router(routes=(f"v1={stable.url}",))
    router.holder.publish(shadowed(stable.url, agreeing.url))
    for index in range(10):
        response = await router.caption(headers={"Content-Type": "image/png", "X-User-Id": f"u{index}"})
        assert response.status == 200 and response.headers["X-Routed-Version"] == "v1"
        assert (await response.json())["model_version"] == "v1"

    async def copied() -> bool:
        return int((await router.figures("v2"))["shadow"]["copies"]) == 10

    await until(copied)
    canary = await router.figures("v2", "window")
    assert canary["requests"] == 0 and canary["bulk"] == 0  # copies are no live traffic
    shadow = canary["shadow"]
    assert (shadow["errors"], shadow["dropped"], shadow["agreement"], shadow["token_overlap"]) == (
        0,
        0,
        1.0,
        1.0,
    )
    assert shadow["latency_ms"]["p99"] is not None
    # Each copy is the client's request, marked bulk, with its own request id.
    assert all(r.headers["X-Priority"] == "bulk" for r in agreeing.received)
    assert [r.body for r in agreeing.received] == [r.body for r in stable.received]
    ids = {r.headers["X-Request-Id"] for r in agreeing.received}
    assert ids == {r.headers["X-Request-Id"] + ".shadow" for r in stable.received}
    live = await router.figures("v1", "window")
    assert live["requests"] == 10 and live["confidence"] == {"count": 10, "sum": 9.0, "mean": 0.9}
    samples = await router.scrape()
    assert samples['captionfleet_router_shadow_copies_total{outcome="agree",version="v2"}'] == 10
    assert samples['captionfleet_router_answer_confidence_count{version="v1"}'] == 10


async def test_a_different_caption_is_a_disagreement_and_bulk_requests_are_never_copied(
    start_runtime: Any, start_router: Any
) -> None:
    stable, canary = await start_runtime("v1"), await start_runtime("v2")  # "a caption by v2"
    router = await start_router(routes=(f"v1={stable.url}",))
    router.holder.publish(shadowed(stable.url, canary.url))
    await router.caption(headers={"Content-Type": "image/png", "X-Priority": "bulk"})
    canary.statuses = [422, 500]
    for _ in range(4):
        assert (await router.caption()).status == 200

    async def copied() -> bool:
        return int((await router.figures("v2"))["shadow"]["copies"]) == 4

    await until(copied)
    shadow = (await router.figures("v2"))["shadow"]
    assert len(canary.received) == 4  # the bulk request got no copy
    # 422: a disagreement; 500: an error; two others: "a caption by v1" against "... by v2".
    assert (shadow["errors"], shadow["compared"], shadow["exact_matches"]) == (1, 3, 0)
    assert shadow["token_overlap"] == pytest.approx((0 + 0.75 + 0.75) / 3, abs=1e-6)
    samples = await router.scrape()
    assert samples['captionfleet_router_shadow_errors_total{kind="status_5xx",version="v2"}'] == 1
    assert samples['captionfleet_router_shadow_copies_total{outcome="differ",version="v2"}'] == 3


async def test_only_the_mirror_share_of_requests_is_copied(start_runtime: Any, start_router: Any) -> None:
    stable, canary = await start_runtime("v1"), await start_runtime("v1")
    router = await start_router(routes=(f"v1={stable.url}",))
    router.holder.publish(shadowed(stable.url, canary.url, mirror=20))
    for _ in range(200):
        assert (await router.caption()).status == 200
    shadower = router.app[ROUTER].shadower

    async def settled() -> bool:
        return shadower.in_flight == 0

    await until(settled)
    copies = int((await router.figures("v2"))["shadow"]["copies"])
    assert copies == len(canary.received) and 20 <= copies <= 60  # 40 expected (seeded)


async def test_a_hung_canary_leaves_answers_alone_and_copies_are_bounded_and_drops_counted(
    start_runtime: Any, start_router: Any
) -> None:
    stable, canary = await start_runtime("v1"), await start_runtime("v1")
    canary.hang = True
    router = await start_router(
        routes=(f"v1={stable.url}",), shadow_max_in_flight=4, shadow_timeout_ms=30_000
    )
    router.holder.publish(shadowed(stable.url, canary.url))
    latencies = []
    for _ in range(20):
        started = time.monotonic()
        response = await router.caption()
        latencies.append(time.monotonic() - started)
        assert response.status == 200 and (await response.json())["model_version"] == "v1"
    assert max(latencies) < 2.0  # nothing waited for the hung canary (its copies wait up to 30 s)

    async def four_held() -> bool:
        return len(canary.received) == 4

    await until(four_held)
    shadow = (await router.figures("v2"))["shadow"]
    assert (shadow["copies"], shadow["dropped"]) == (0, 16)
    samples = await router.scrape()
    assert samples['captionfleet_router_shadow_dropped_total{version="v2"}'] == 16
    assert samples["captionfleet_router_shadow_in_flight"] == 4
    canary.release.set()

    async def answered() -> bool:
        return int((await router.figures("v2"))["shadow"]["copies"]) == 4

    await until(answered)
    assert len(canary.received) == 4 and (await router.scrape())["captionfleet_router_shadow_in_flight"] == 0


async def test_a_copy_that_times_out_counts_as_a_timeout(start_runtime: Any, start_router: Any) -> None:
    stable, canary = await start_runtime("v1"), await start_runtime("v1")
    canary.hang = True
    router = await start_router(routes=(f"v1={stable.url}",), shadow_timeout_ms=200)
    router.holder.publish(shadowed(stable.url, canary.url))
    assert (await router.caption()).status == 200

    async def failed() -> bool:
        return int((await router.figures("v2"))["shadow"]["errors"]) == 1

    await until(failed)
    samples = await router.scrape()
    assert samples['captionfleet_router_shadow_errors_total{kind="timeouts",version="v2"}'] == 1


def batch_result(caption: str, confidence: float = 0.8) -> dict[str, Any]:
    return {"caption": caption, "confidence": confidence, "suggestions": [], "cached": False}


def failed_result(status: int) -> dict[str, Any]:
    return {"error": {"code": f"fake_{status}", "message": "scripted"}, "status": status}


async def test_a_batch_is_copied_and_compared_image_by_image_and_jobs_never_are(
    start_runtime: Any, start_router: Any
) -> None:
    stable, canary = await start_runtime("v1"), await start_runtime("v2")
    # The primary: image 1 failed (not compared); the canary: image 0 the same, 2 another caption,
    # 3 failed on its side (an error), 4 a 4xx of its own (a disagreement).
    stable.batch_results = [batch_result("a red circle", 0.6), failed_result(415)] + [
        batch_result("a blue square", 0.4)
    ] * 3
    canary.batch_results = [
        batch_result("A red circle."),
        batch_result("anything"),
        batch_result("a blue circle"),
        failed_result(503),
        failed_result(400),
    ]
    router = await start_router(routes=(f"v1={stable.url}",))
    router.holder.publish(shadowed(stable.url, canary.url))
    batch = {"data": b"five images", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}
    response = await router.client.post(router.url + "/v1/caption/batch", **batch)
    assert response.status == 200 and await response.json() == {
        "results": stable.batch_results,
        "model_version": "v1",
        "request_id": response.headers["X-Request-Id"],
    }
    bulk = {"Content-Type": "multipart/form-data; boundary=x", "X-Priority": "bulk"}
    assert (await router.client.post(router.url + "/v1/caption/batch", data=b"x", headers=bulk)).status == 200
    job = await router.client.post(router.url + "/v1/jobs", json={"items": [{"url": "http://x/a.png"}]})
    assert job.status == 202

    async def copied() -> bool:
        return int((await router.figures("v2"))["shadow"]["copies"]) == 4

    await until(copied)
    shadow = (await router.figures("v2"))["shadow"]
    assert (shadow["errors"], shadow["compared"], shadow["exact_matches"]) == (1, 3, 1)
    assert shadow["token_overlap"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3, abs=1e-6)
    assert [r.path_qs for r in canary.received] == ["/v1/caption/batch"]  # no bulk batch, no job
    assert canary.received[0].body == b"five images"
    assert canary.received[0].headers["Content-Type"] == "multipart/form-data; boundary=x"
    # The primary's answer counts each image's confidence, bulk ones none.
    assert (await router.figures("v1"))["confidence"] == {"count": 4, "sum": 1.8, "mean": 0.45}
    samples = await router.scrape()
    outcomes = ("agree", "differ", "error")
    copies = [
        samples[f'captionfleet_router_shadow_copies_total{{outcome="{o}",version="v2"}}'] for o in outcomes
    ]
    assert copies == [1, 2, 1]


async def test_a_copy_that_cannot_start_is_dropped_once_per_image_compared(
    start_runtime: Any, start_router: Any
) -> None:
    stable, canary = await start_runtime("v1"), await start_runtime("v1")
    stable.batch_results = [batch_result("a cat"), failed_result(415), batch_result("a dog")]
    canary.hang = True
    router = await start_router(
        routes=(f"v1={stable.url}",), shadow_max_in_flight=1, shadow_timeout_ms=30_000
    )
    router.holder.publish(shadowed(stable.url, canary.url))
    assert (await router.caption()).status == 200  # the one copy allowed: held by the canary

    async def held() -> bool:
        return len(canary.received) == 1

    await until(held)
    batch = await router.client.post(router.url + "/v1/caption/batch", data=b"x")
    assert batch.status == 200
    shadow = (await router.figures("v2"))["shadow"]
    assert (shadow["copies"], shadow["dropped"]) == (0, 2)
    canary.release.set()
