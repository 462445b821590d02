"""The cascade through the real router in front of fake runtimes: who answers, the markers, the
deadline rule, a failing quality tier, the figures, and tables with a cascade from each source."""

from __future__ import annotations

from typing import Any

import pytest

from captionfleet.runtime.router.cascade import CascadePlan, plan_from_mapping, with_cascade
from captionfleet.runtime.router.sources import parse_routes_document
from captionfleet.runtime.router.table import RoutingTable, TableError, Version
from captionfleet.runtime.router.watch import table_from_status


async def cascade_router(start_runtime: Any, start_router: Any, **overrides: Any) -> tuple[Any, Any, Any]:
    fast, quality = await start_runtime("fast"), await start_runtime("quality")
    settings = {
        "routes": (f"fast={fast.url}", f"quality={quality.url}"),
        "weights": ("fast=50", "quality=50"),
        "cascade_fast": ("fast",),
        "cascade_quality": ("quality",),
        "cascade_threshold": 0.5,
    }
    router = await start_router(**(settings | overrides))
    return router, fast, quality


async def test_unsure_answers_are_escalated_and_sure_ones_are_the_fast_models(
    start_runtime: Any, start_router: Any
) -> None:
    router, fast, quality = await cascade_router(start_runtime, start_router)
    fast.confidences = [0.9, 0.2, 0.7, 0.1]
    answers = []
    for index in range(4):
        response = await router.caption(headers={"X-Request-Id": f"req-{index}", "Content-Type": "image/png"})
        assert response.status == 200
        body = await response.json()
        assert body["model_version"] == response.headers["X-Routed-Version"]
        answers.append((body["model_version"], body["cascade"]))
    assert answers == [
        ("fast", {"escalated": False, "fast_confidence": 0.9}),
        ("quality", {"escalated": True, "fast_confidence": 0.2}),
        ("fast", {"escalated": False, "fast_confidence": 0.7}),
        ("quality", {"escalated": True, "fast_confidence": 0.1}),
    ]
    # The quality tier got the same request: its id and its body.
    assert [r.headers["X-Request-Id"] for r in quality.received] == ["req-1", "req-3"]
    assert all(r.body == b"\x89PNG fake image bytes" for r in quality.received)
    _, stats = await router.get_json("/v1/router/stats")
    cascade = stats["cascade"]
    assert (cascade["requests"], cascade["escalated"], cascade["escalation_rate"]) == (4, 2, 0.5)
    assert cascade["tiers"]["fast"]["requests"] == 4 and cascade["tiers"]["quality"]["requests"] == 2
    assert stats["versions"]["fast"]["total"]["requests"] == 4  # each hop counts for its version
    assert stats["versions"]["quality"]["total"]["requests"] == 2
    samples = await router.scrape()
    assert samples['captionfleet_router_cascade_requests_total{outcome="escalated"}'] == 2
    assert samples['captionfleet_router_cascade_requests_total{outcome="confident"}'] == 2
    assert samples['captionfleet_router_cascade_tier_duration_seconds_count{tier="quality"}'] == 2
    assert samples["captionfleet_router_cascade_threshold"] == 0.5


async def test_too_little_budget_for_two_hops_returns_the_fast_answer_marked(
    start_runtime: Any, start_router: Any
) -> None:
    router, fast, quality = await cascade_router(start_runtime, start_router)
    quality.answer_delay_s = 0.4
    fast.confidences = [0.1, 0.1]
    first = await router.caption()  # 5 s of budget: escalated, and the quality tier's latency is known
    assert (await first.json())["cascade"]["escalated"] is True
    short = await router.caption(headers={"X-Request-Timeout-Ms": "250", "Content-Type": "image/png"})
    body = await short.json()
    assert short.status == 200, body
    assert body["model_version"] == "fast"
    assert body["cascade"] == {"escalated": False, "fast_confidence": 0.1, "skipped": "deadline"}
    assert len(quality.received) == 1  # never asked: the budget could not cover it
    _, stats = await router.get_json("/v1/router/stats")
    assert stats["cascade"]["outcomes"]["deadline"] == 1


async def test_a_failing_quality_tier_leaves_the_fast_answer(start_runtime: Any, start_router: Any) -> None:
    router, fast, quality = await cascade_router(start_runtime, start_router, retry=False)
    fast.confidences = [0.1]
    quality.statuses = [500]
    response = await router.caption()
    body = await response.json()
    assert response.status == 200
    assert body["model_version"] == "fast"
    assert body["cascade"]["skipped"] == "quality_failed" and body["cascade"]["escalated"] is False


async def test_errors_of_the_fast_tier_are_relayed_and_no_threshold_escalates_nothing(
    start_runtime: Any, start_router: Any
) -> None:
    router, fast, quality = await cascade_router(start_runtime, start_router, cascade_threshold=-1.0)
    fast.statuses = [415]
    refused = await router.caption()
    assert refused.status == 415 and (await refused.json())["error"]["code"] == "fake_415"
    fast.confidences = [0.01]
    response = await router.caption()
    body = await response.json()
    assert body["model_version"] == "fast" and body["cascade"]["skipped"] == "no_threshold"
    assert quality.received == []


async def test_a_batch_is_escalated_whole_when_one_image_is_unsure(
    start_runtime: Any, start_router: Any
) -> None:
    router, fast, quality = await cascade_router(start_runtime, start_router)
    fast.confidences = [0.3]
    response = await router.client.post(
        router.url + "/v1/caption/batch", data=b"x", headers={"Content-Type": "image/png"}
    )
    body = await response.json()
    assert body["model_version"] == "quality" and body["cascade"]["escalated"] is True
    assert len(quality.received) == 1


def test_a_cascade_names_versions_of_the_table() -> None:
    table = RoutingTable(
        (Version("a", 50, "stable", ("http://a:1",)), Version("b", 50, "variant", ("http://b:1",)))
    )
    plan = with_cascade(table, {"fast": ["a"], "quality": "b", "threshold": 0.4}).cascade
    assert plan == CascadePlan(("a",), ("b",), 0.4, "confidence")
    for bad in (
        {"fast": ["a"], "quality": ["c"]},
        {"fast": ["a"], "quality": ["a"]},
        {"fast": [], "quality": ["b"]},
        {"fast": ["a"], "quality": ["b"], "threshold": "high"},
        {"fast": ["a"], "quality": ["b"], "signal": "mood"},
    ):
        with pytest.raises(TableError):
            plan_from_mapping(bad, ["a", "b"])
    ood = plan_from_mapping({"fast": ["a"], "quality": ["b"], "threshold": 0.9, "signal": "ood"}, ["a", "b"])
    assert ood.unsure({"ood_score": 0.95}) is True and ood.unsure({"ood_score": 0.5}) is False
    assert ood.unsure({"confidence": 0.1}) is None  # no OOD score: no value of the signal


def test_the_cascade_comes_from_a_routes_file_and_from_the_status() -> None:
    text = """
versions:
  - {name: f, weight: 50, endpoints: [http://f:1]}
  - {name: q, weight: 50, endpoints: [http://q:1]}
cascade: {fast: [f], quality: [q], threshold: 0.6}
"""
    assert parse_routes_document(text, "r.yaml").cascade == CascadePlan(("f",), ("q",), 0.6)
    model = {
        "metadata": {"name": "m"},
        "status": {
            "versions": [{"name": "f", "weight": 50}, {"name": "q", "weight": 50}],
            "cascade": {"fastVersions": ["f"], "qualityVersions": ["q"], "threshold": None},
        },
    }
    table = table_from_status(model, None, namespace="ml", service_port=8080)
    assert table.cascade == CascadePlan(("f",), ("q",), None)


@pytest.mark.parametrize("tier", ["fast", "quality"])
async def test_each_hop_counts_its_confidence_and_copies_to_the_mirrored_canary_of_its_tier(
    start_runtime: Any, start_router: Any, eventually: Any, tier: str
) -> None:
    fast, quality = await start_runtime("fast"), await start_runtime("quality")
    canary = await start_runtime(tier)  # captions as its tier's version does: agreement 1.0 with it
    router = await start_router(routes=(f"fast={fast.url}", f"quality={quality.url}"))
    versions = (
        Version("fast", 50, "stable", (fast.url,)),
        Version("quality", 50, "variant", (quality.url,)),
        Version("next", 0, "canary", (canary.url,), mirror=100),
    )
    tiers = {"fast": ["fast"], "quality": ["quality"]}
    tiers[tier].append("next")
    table = with_cascade(RoutingTable(versions, "test"), {**tiers, "threshold": 0.5})
    router.holder.publish(table)
    fast.confidences = [0.9, 0.2, 0.8, 0.1]
    quality.confidences = [0.7, 0.6]
    for index in range(4):
        headers = {"Content-Type": "image/png", "X-Request-Id": f"req-{index}"}
        response = await router.caption(headers=headers, params={"suggestions": "2"})
        assert response.status == 200
        assert (await response.json())["model_version"] == ("quality" if index in (1, 3) else "fast")
    bulk = {"Content-Type": "image/png", "X-Priority": "bulk"}
    assert (await router.caption(headers=bulk)).status == 200
    copied_ids = ["req-0", "req-1", "req-2", "req-3"] if tier == "fast" else ["req-1", "req-3"]

    async def copied() -> bool:
        return int((await router.figures("next"))["shadow"]["copies"]) == len(copied_ids)

    await eventually(copied, timeout_s=10, what="every copy answered")
    shadow = (await router.figures("next", "window"))["shadow"]
    assert (shadow["errors"], shadow["dropped"], shadow["agreement"], shadow["token_overlap"]) == (
        0,
        0,
        1.0,
        1.0,
    )
    # Each copy is the request as sent to the tier: its path and query, body and id, marked bulk.
    assert [r.headers["X-Request-Id"] for r in canary.received] == [f"{i}.shadow" for i in copied_ids]
    assert all(r.path_qs == "/v1/caption?suggestions=2" for r in canary.received)
    assert all(r.headers["X-Priority"] == "bulk" for r in canary.received)
    assert all(r.body == b"\x89PNG fake image bytes" for r in canary.received)
    # Each hop's confidence for the version that answered it (the bulk request's for none).
    assert (await router.figures("fast"))["confidence"] == {"count": 4, "sum": 2.0, "mean": 0.5}
    assert (await router.figures("quality"))["confidence"] == {"count": 2, "sum": 1.3, "mean": 0.65}
    assert (await router.figures("next"))["requests"] == 0
    samples = await router.scrape()
    assert samples['captionfleet_router_answer_confidence_count{version="fast"}'] == 4
    assert samples['captionfleet_router_answer_confidence_count{version="quality"}'] == 2
    assert samples['captionfleet_router_shadow_copies_total{outcome="agree",version="next"}'] == len(
        copied_ids
    )
