"""The job API through the real router, in front of fake runtimes that each keep their own job store:
the version a job goes to, the id that leads back to it from any router, the streamed results, the
limits and error bodies, and bulk work kept out of the interactive figures."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import aiohttp
import pytest

from captionfleet.runtime.router.jobs import locate
from captionfleet.runtime.router.table import RoutingTable, Version

from .test_proxy import assert_error

JOB = {"items": [{"url": "https://example.com/a.jpg"}, {"url": "https://example.com/b.jpg"}]}


async def submit(router: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with router.client.post(router.url + "/v1/jobs", json=JOB, headers=headers or {}) as response:
        return response.status, await response.json(), response.headers


async def test_a_job_id_names_its_version_and_leads_any_router_back_to_it(
    start_runtime: Any, start_router: Any
) -> None:
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    routes = (f"v1={v1.url}", f"v2={v2.url}")
    first = await start_router(routes=routes, weights=("v1=50", "v2=50"), canary="v2")
    status, job, headers = await submit(first, {"X-User-Id": "someone"})
    assert status == 202
    version, _, runtime_id = job["id"].partition(".")
    owner = {"v1": v1, "v2": v2}[version]
    assert runtime_id in owner.jobs and headers["X-Routed-Version"] == version
    assert headers["Location"] == f"/v1/jobs/{job['id']}"
    # Another router pod (or this one restarted), where every user now goes to the other version.
    other = "v2" if version == "v1" else "v1"
    second = await start_router(routes=routes, weights=(f"{version}=0", f"{other}=100"))
    code, seen = await second.get_json(f"/v1/jobs/{job['id']}")
    assert code == 200 and seen["id"] == job["id"] and seen["status"] == "queued"
    async with second.client.delete(second.url + f"/v1/jobs/{job['id']}") as response:
        assert response.status == 200 and (await response.json())["status"] == "cancelled"
    assert owner.jobs[runtime_id]["status"] == "cancelled"
    assert all(r.path_qs.startswith(f"/v1/jobs/{runtime_id}") for r in owner.received[1:])


async def test_jobs_stick_to_a_version_by_user_and_else_by_api_key(
    start_runtime: Any, start_router: Any
) -> None:
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    keys = [f"key-{i}" for i in range(12)]
    router = await start_router(
        routes=(f"v1={v1.url}", f"v2={v2.url}"), weights=("v1=50", "v2=50"), canary="v2", api_keys=tuple(keys)
    )
    chosen: dict[str, set[str]] = {}
    for key in keys:
        for _ in range(3):
            status, job, _ = await submit(router, {"X-API-Key": key})
            assert status == 202
            chosen.setdefault(key, set()).add(job["id"].partition(".")[0])
    assert all(len(versions) == 1 for versions in chosen.values()), chosen
    assert {next(iter(v)) for v in chosen.values()} == {"v1", "v2"}  # spread by weight, not all on one
    # A user id decides over the key, as for captions.
    by_user = {(await submit(router, {"X-API-Key": k, "X-User-Id": "u-7"}))[1]["id"][:2] for k in keys}
    assert len(by_user) == 1


async def test_ids_that_name_no_version_are_404_and_a_version_without_pods_is_503(
    start_runtime: Any, start_router: Any
) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",))
    for job in ("nothing", "v9.abc", "v1.", "v1"):
        code, body = await router.get_json(f"/v1/jobs/{job}")
        assert code == 404, job
        assert_error(body, "job_not_found")
    code, body = await router.get_json("/v1/jobs/v1.0123abcd")  # the runtime's own 404, relayed
    assert code == 404 and body["error"]["code"] == "job_not_found"
    router.holder.publish(
        RoutingTable((Version("v1", 100, "stable", (v1.url,)), Version("v2", 0, "canary", ())), "test")
    )
    async with router.client.get(router.url + "/v1/jobs/v2.0123abcd/results") as response:
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        assert_error(await response.json(), "no_route")


def test_the_longest_version_name_that_prefixes_an_id_wins() -> None:
    table = RoutingTable(
        (Version("a", 50, "stable", ("http://h:1",)), Version("a.b", 50, "variant", ("http://h:2",))), "t"
    )
    assert locate(table, "a.b.ff")[0].name == "a.b" and locate(table, "a.b.ff")[1] == "ff"
    assert locate(table, "a.ff") == (table.versions[0], "ff")


async def test_results_stream_past_the_answer_limit_and_the_deadline(
    start_runtime: Any, start_router: Any
) -> None:
    v1 = await start_runtime("v1")
    v1.result_lines = 2000  # ~450 kB, over the router's max_response_bytes below
    router = await start_router(
        routes=(f"v1={v1.url}",), max_response_bytes=64 * 1024, request_timeout_ms=600
    )
    _, job, _ = await submit(router)
    async with router.client.get(router.url + f"/v1/jobs/{job['id']}/results") as response:
        assert response.status == 200 and response.headers["X-Request-Id"]
        lines = (await response.read()).splitlines()
    assert [int(line.split(b",")[0].split(b":")[1]) for line in lines] == list(range(2000))
    # Slower than the whole deadline, each line well within it: complete, never a 504 midway.
    v1.result_lines, v1.line_gap = 4, asyncio.Event()
    async with router.client.get(router.url + f"/v1/jobs/{job['id']}/results") as response:
        assert response.status == 200
        received = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(4):
            await asyncio.sleep(0.3)  # a slow stream on purpose (time must pass), not synchronisation
            v1.line_gap.set()
            received.append(await response.content.readline())
        assert loop.time() - started > 1.2 and await response.content.read() == b""
    assert len(received) == 4 and all(line.endswith(b"\n") for line in received)


async def test_results_cut_short_by_the_runtime_never_look_complete(
    start_runtime: Any, start_router: Any
) -> None:
    v1 = await start_runtime("v1")
    v1.result_lines, v1.die_after_lines = 50, 20
    router = await start_router(routes=(f"v1={v1.url}",))
    _, job, _ = await submit(router)
    async with router.client.get(router.url + f"/v1/jobs/{job['id']}/results") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    code, _ = await router.get_json("/healthz")  # the router itself is fine
    assert code == 200


async def test_job_bodies_have_their_own_bound_and_a_job_without_an_id_is_a_bad_answer(
    start_runtime: Any, start_router: Any
) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",), max_body_bytes=1024, jobs_max_bytes=64 * 1024)
    big = {"items": [{"image_base64": "A" * 20_000}]}
    async with router.client.post(router.url + "/v1/jobs", json=big) as response:
        assert response.status == 202  # over max_body_bytes, within jobs_max_bytes
    async with router.client.post(router.url + "/v1/caption", json=big) as response:
        assert response.status == 413
    huge = {"items": [{"image_base64": "A" * 70_000}]}
    async with router.client.post(router.url + "/v1/jobs", json=huge) as response:
        assert response.status == 413
        assert_error(await response.json(), "payload_too_large")
    v1.job_id_in_answer = False
    status, body, _ = await submit(router)
    assert status == 502
    assert_error(body, "bad_upstream_response")


async def test_bulk_work_never_counts_as_interactive_demand(start_runtime: Any, start_router: Any) -> None:
    v1 = await start_runtime("v1")
    router = await start_router(routes=(f"v1={v1.url}",))
    for _ in range(3):
        assert (await router.caption()).status == 200
    bulk_headers = {"X-Priority": "bulk", "Content-Type": "image/png"}
    for _ in range(4):
        assert (await router.caption(headers=bulk_headers)).status == 200
    _, job, _ = await submit(router)
    await router.get_json(f"/v1/jobs/{job['id']}")
    async with router.client.get(router.url + f"/v1/jobs/{job['id']}/results") as response:
        await response.read()
    assert Counter(r.headers.get("X-Priority") for r in v1.received)["bulk"] == 4  # passed through
    _, stats = await router.get_json("/v1/router/stats")
    total = stats["versions"]["v1"]["total"]
    assert total["requests"] == 3 and total["bulk"] == 7 and sum(total["latency_ms"]["counts"]) == 3
    async with router.client.get(router.url + "/metrics") as response:
        metrics = await response.text()
    assert 'captionfleet_router_requests_total{code="200",version="v1"} 3.0' in metrics
    assert 'captionfleet_router_bulk_requests_total{code="200",version="v1"} 6.0' in metrics
    assert 'captionfleet_router_bulk_requests_total{code="202",version="v1"} 1.0' in metrics


async def test_a_submission_is_never_sent_twice_but_an_unreachable_pod_is_skipped(
    start_runtime: Any, start_router: Any, dead_url: str
) -> None:
    first, second = await start_runtime("v1"), await start_runtime("v1")
    first.drop_job_answers = second.drop_job_answers = True
    router = await start_router(routes=(f"v1={first.url}", f"v1={second.url}"))
    status, body, _ = await submit(router)
    assert status == 502 and body["error"]["code"] == "upstream_unreachable"
    assert "not sent again" in body["error"]["message"]
    assert len(first.received) + len(second.received) == 1  # the job may exist: never a second one
    live = await start_runtime("v1")
    router = await start_router(routes=(f"v1={dead_url}", f"v1={live.url}"))
    status, job, _ = await submit(router)
    assert status == 202 and job["id"].startswith("v1.")  # nothing was sent to the dead one: retried


async def test_a_client_that_leaves_mid_stream_is_no_error_of_the_router(
    start_runtime: Any, start_router: Any, eventually: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    v1 = await start_runtime("v1")
    v1.result_lines, v1.line_gap = 400, asyncio.Event()
    router = await start_router(routes=(f"v1={v1.url}",))
    _, job, _ = await submit(router)
    async with router.client.get(router.url + f"/v1/jobs/{job['id']}/results") as response:
        v1.line_gap.set()
        await response.content.readline()
        response.close()  # gone, with most lines still to come

    async def relayed_on() -> bool:
        v1.line_gap.set()  # the runtime goes on writing; the router meets the closed client
        return "the client left" in caplog.text or "client went away" in caplog.text  # handler cancelled

    await eventually(relayed_on, what="the router noticed the client had gone")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    code, _ = await router.get_json("/healthz")
    assert code == 200
