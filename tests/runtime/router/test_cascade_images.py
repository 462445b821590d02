"""The cascade in front of two real servers (the bundled fast and quality models), fed every kind of
image: each image gets the answer its tier gives when asked directly, the same caption or the same
4xx code. The router never decodes an image; this checks that nothing on the way (the held body, the
second hop) changes what the runtimes see."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from captionfleet.runtime.engine.captioner import Captioner, bundled_model_dir, load_captioner
from tests.runtime.server.test_image_paths import CORPUS


@pytest.fixture(scope="module")
def tiers() -> dict[str, Captioner]:
    models = bundled_model_dir().parent
    return {tier: load_captioner(str(models / f"scenes-blip-{tier}")) for tier in ("fast", "tiny")}


async def _answer(http: aiohttp.ClientSession, url: str, data: bytes) -> tuple[tuple[int, str], Any]:
    headers = {"Content-Type": "application/octet-stream"}
    async with http.post(url + "/v1/caption", data=data, headers=headers) as response:
        body = await response.json()
        if response.status == 200:
            return (200, body["caption"]), body.get("cascade")
        return (response.status, body["error"]["code"]), None


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["fast-answers", "quality-answers"])
async def test_every_image_gets_its_tiers_own_answer_through_the_cascade(
    threshold: float,
    tiers: dict[str, Captioner],
    start_server: Any,
    start_router: Any,
    http: aiohttp.ClientSession,
) -> None:
    fast = await start_server(captioner=tiers["fast"], cache_size=0, model_version="fast")
    quality = await start_server(captioner=tiers["tiny"], cache_size=0, model_version="quality")
    router = await start_router(
        routes=(f"fast={fast.url}", f"quality={quality.url}"),
        weights=("fast=50", "quality=50"),
        cascade_fast=("fast",),
        cascade_quality=("quality",),
        cascade_threshold=threshold,
    )
    wrong = {}
    tiers_used = set()
    for name, (data, _) in CORPUS.items():
        through, marker = await _answer(http, router.url, data)
        fast_answer, _ = await _answer(http, fast.url, data)
        if through[0] != 200 or fast_answer[0] != 200:
            expected = fast_answer  # the fast tier's error is relayed, never escalated
        else:
            escalated = marker["escalated"]
            tiers_used.add(escalated)
            expected = (await _answer(http, quality.url, data))[0] if escalated else fast_answer
        if through != expected:
            wrong[name] = (through, expected)
    assert not wrong
    # The tier meant to answer did: at 0 nothing is unsure enough, at 1 all but a (rare) sure answer are.
    assert (True in tiers_used) == (threshold == 1.0) and (False in tiers_used or threshold == 1.0)
