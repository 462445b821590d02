"""Shadow copies of every kind of caption request, with real runtimes (the tiny model, in-process
servers) behind the real router: raw, multipart and JSON bodies, an image by URL, and batches in both
of their forms, each copied to the canary and compared caption by caption (per image for a batch);
bulk requests never copied."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
from aiohttp import web

from captionfleet.runtime.router.app import ROUTER
from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.runtime.server.testing import encode, serve_app, shapes_image


def b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def multipart(field: str, images: list[bytes]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for index, image in enumerate(images):
        form.add_field(field, image, filename=f"{index}.png", content_type="image/png")
    return form


async def test_every_kind_of_caption_request_is_copied_and_compared_per_image(
    start_server: Any, start_router: Any, eventually: Any
) -> None:
    images = [encode(shapes_image(index)) for index in range(8)]

    async def image_file(request: web.Request) -> web.Response:
        return web.Response(body=images[int(request.match_info["n"])], content_type="image/png")

    host = web.Application()
    host.router.add_get("/{n}.png", image_file)
    runner, port = await serve_app(host)
    try:
        stable = await start_server(allow_private_urls=True)  # the image host is on loopback
        canary = await start_server(allow_private_urls=True)  # the same model: every caption agrees
        router = await start_router(routes=(f"v1={stable.url}",))
        router.holder.publish(
            RoutingTable(
                (
                    Version("v1", 100, "stable", (stable.url,)),
                    Version("v2", 0, "canary", (canary.url,), mirror=100),
                ),
                "test",
            )
        )
        post = router.client.post
        single = router.url + "/v1/caption"
        batch = router.url + "/v1/caption/batch"
        sent = [
            post(single, data=images[0], headers={"Content-Type": "image/png"}),
            post(single, data=multipart("image", images[1:2])),
            post(single, json={"image_base64": b64(images[2])}, params={"suggestions": "2"}),
            post(single, json={"url": f"http://127.0.0.1:{port}/3.png"}),
            post(batch, data=multipart("images", [images[4], b"not an image", images[5]])),
            post(
                batch, json={"images": [{"image_base64": b64(images[6])}, {"image_base64": b64(images[7])}]}
            ),
            post(single, data=images[0], headers={"Content-Type": "image/png", "X-Priority": "bulk"}),
        ]
        answers = []
        for request in sent:
            async with request as response:
                answers.append((response.status, response.headers["X-Routed-Version"], await response.json()))
        assert [(status, version) for status, version, _ in answers] == [(200, "v1")] * len(sent), answers
        captions = [body["caption"] for _, _, body in answers[:4]]
        results = [r for _, _, body in answers[4:6] for r in body["results"]]
        assert [("caption" in r) for r in results] == [True, False, True, True, True]  # one is no image
        # 4 single requests, 2 + 2 images of batches with a caption: 8 copies, all the same captions.

        shadower = router.app[ROUTER].shadower

        async def settled() -> bool:
            return shadower.in_flight == 0

        await eventually(settled, timeout_s=60, what="every copy answered")
        shadow = (await router.figures("v2"))["shadow"]
        assert (shadow["copies"], shadow["errors"], shadow["compared"], shadow["exact_matches"]) == (
            8,
            0,
            8,
            8,
        )
        assert shadow["agreement"] == 1.0 and shadow["dropped"] == 0
        confidence = (await router.figures("v1"))["confidence"]
        expected = sum(body["confidence"] for _, _, body in answers[:4]) + sum(
            r["confidence"] for r in results if "caption" in r
        )
        assert confidence["count"] == 8 and abs(confidence["sum"] - expected) < 1e-3  # not the bulk one
        assert len(set(captions)) > 1  # the tiny model's captions differ by image: agreement means something
    finally:
        await runner.cleanup()
