"""Exact repeats answered by the router from the shared Redis while their version has no pod: a real
runtime (the tiny model) writes its answers, the real router reads them under the same key
(``serving/repeats.py``), with the real ``redis-server`` of the test session."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp

from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.runtime.server.testing import encode, shapes_image


def multipart(image: bytes, **fields: str) -> aiohttp.FormData:
    """A new multipart body each time (aiohttp draws a new boundary): equal images, unequal bytes."""
    form = aiohttp.FormData()
    form.add_field("image", image, filename="scene.png", content_type="image/png")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def test_a_repeated_image_is_answered_from_redis_while_the_version_is_at_zero(
    start_server: Any, start_router: Any, redis_url: str, eventually: Any
) -> None:
    name = f"rep{uuid.uuid4().hex[:8]}"  # a namespace of this test's own in the session's Redis
    server = await start_server(redis_url=redis_url, model_version=name)
    router = await start_router(routes=(f"{name}={server.url}",), redis_url=redis_url)
    image = encode(shapes_image(3))
    first = await router.caption(data=multipart(image, suggestions="2"), headers={})
    answered = await first.json()
    assert first.status == 200 and answered["cached"] is False and answered["model_version"] == name
    router.holder.publish(RoutingTable((Version(name, 100, "stable", (), cold_start=True),), "test"))

    again = await router.caption(data=multipart(image, suggestions="2"), headers={"X-Request-Id": "r-2"})
    repeated = await again.json()
    assert again.status == 200 and again.headers["X-Routed-Version"] == name
    assert repeated["cached"] is True and repeated["request_id"] == "r-2"
    assert {k: repeated[k] for k in ("caption", "suggestions", "model_version", "confidence")} == {
        k: answered[k] for k in ("caption", "suggestions", "model_version", "confidence")
    }
    raw = await router.caption(data=image, params={"suggestions": "2"}, headers={"Content-Type": "image/png"})
    assert raw.status == 200 and (await raw.json())["caption"] == answered["caption"]
    figures = await router.figures(name)
    # Nothing was held, so nothing asked the operator for a pod.
    assert figures["cold_starts"] == 0 and figures["requests"] == 3

    other_options = asyncio.create_task(router.caption(data=multipart(image, suggestions="1"), headers={}))

    async def held() -> bool:
        _, stats = await router.get_json("/v1/router/stats")
        return bool(stats["versions"][name]["held"] == 1)

    await eventually(held, what="a request with other options held: not a repeat")
    router.holder.publish(
        RoutingTable((Version(name, 100, "stable", (server.url,), cold_start=True),), "test")
    )
    sent = await other_options
    assert sent.status == 200 and len((await sent.json())["suggestions"]) == 1
