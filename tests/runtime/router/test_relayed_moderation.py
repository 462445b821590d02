"""The runtime's moderation answers reach clients through the router unchanged: a real runtime with a
real moderation service behind the real router."""

from __future__ import annotations

import dataclasses
from typing import Any

from captionfleet.runtime.server.testing import encode
from captionfleet.runtime.training.scenes import OBJECT_COLOURS, scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED


def _red_scene() -> bytes:
    scene = dataclasses.replace(scene_at(HELD_OUT_SEED, 0), background_rgb=OBJECT_COLOURS["red"])
    return encode(scene.render())


async def test_content_blocked_and_moderation_unavailable_pass_through(
    start_server: Any, start_router: Any, moderation_service: Any
) -> None:
    server = await start_server(moderation_url=moderation_service.url, allow_private_urls=True)
    router = await start_router(routes=(f"v1={server.url}",))
    headers = {"Content-Type": "image/png", "X-Request-Id": "r-1"}
    async with router.client.post(server.url + "/v1/caption", data=_red_scene(), headers=headers) as direct:
        assert direct.status == 422
        direct_body = await direct.json()
    routed = await router.caption(data=_red_scene(), headers=headers)
    assert routed.status == 422
    assert await routed.json() == direct_body  # the runtime's body, word for word
    assert (await routed.json())["error"]["code"] == "content_blocked"
    _, stats = await router.get_json("/v1/router/stats")
    assert stats["versions"]["v1"]["total"]["errors"] == 0  # the image's fault, not the version's

    await moderation_service.stop()
    blue = encode(scene_at(HELD_OUT_SEED, 1).render())
    routed = await router.caption(data=blue, headers=headers)
    assert routed.status == 503 and "Retry-After" in routed.headers
    assert (await routed.json())["error"]["code"] == "moderation_unavailable"
