"""The HTTP API of CONTRACT.md over real HTTP, on a real server with the tiny random BLIP."""

from __future__ import annotations

import base64
import json
import logging

import aiohttp
import pytest
from aiohttp import web

from captionfleet.runtime.server.testing import encode, serve_app, shapes_image

CAPTION_FIELDS = {
    "caption",
    "confidence",
    "suggestions",
    "model_version",
    "cached",
    "latency_ms",
    "request_id",
}


async def _json(response: aiohttp.ClientResponse) -> dict:
    assert response.content_type == "application/json", await response.text()
    return dict(await response.json())


async def test_every_input_kind_gives_the_same_caption_in_the_contract_shape(start_server, http) -> None:
    server = await start_server(allow_private_urls=True, cache_size=0)
    image = encode(shapes_image(1))

    image_app = web.Application()

    async def serve_image(request: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    image_app.router.add_get("/cat.png", serve_image)
    runner, image_port = await serve_app(image_app)

    form = aiohttp.FormData()
    form.add_field("image", image, filename="x.png", content_type="application/octet-stream")
    calls = [
        http.post(server.url + "/v1/caption", data=form),
        http.post(server.url + "/v1/caption", data=image, headers={"Content-Type": "image/png"}),
        http.post(server.url + "/v1/caption", json={"image_base64": base64.b64encode(image).decode()}),
        http.post(server.url + "/v1/caption", json={"url": f"http://127.0.0.1:{image_port}/cat.png"}),
    ]
    bodies = []
    try:
        for call in calls:
            async with call as response:
                assert response.status == 200, await response.text()
                bodies.append(await _json(response))
    finally:
        await runner.cleanup()
    for body in bodies:
        assert set(body) == CAPTION_FIELDS
        assert body["caption"] == bodies[0]["caption"] and body["caption"]
        assert 0 < body["confidence"] <= 1
        assert body["suggestions"][0] == {"text": body["caption"], "confidence": body["confidence"]}
        assert body["model_version"] == server.state.service.model_version
        assert body["cached"] is False
    assert len({body["request_id"] for body in bodies}) == 4


async def test_request_ids_are_echoed_or_generated(start_server, http) -> None:
    server = await start_server()
    async with http.get(server.url + "/healthz", headers={"X-Request-Id": "trace-42"}) as response:
        assert response.headers["X-Request-Id"] == "trace-42"
    body = encode(shapes_image(2))
    headers = {"X-Request-Id": "abc-1", "Content-Type": "image/png"}
    async with http.post(server.url + "/v1/caption", data=body, headers=headers) as response:
        assert (await response.json())["request_id"] == "abc-1"
    async with http.post(
        server.url + "/v1/caption", data=b"", headers={"X-Request-Id": "x" * 500}
    ) as response:
        generated = response.headers["X-Request-Id"]
        assert len(generated) == 32 and (await response.json())["request_id"] == generated


async def test_options_from_query_and_body_are_validated(start_server, http) -> None:
    server = await start_server()
    image = encode(shapes_image(3))
    url = server.url + "/v1/caption?suggestions=3&num_beams=4"
    async with http.post(url, data=image, headers={"Content-Type": "image/png"}) as response:
        body = await _json(response)
        assert response.status == 200, body
        assert 1 <= len(body["suggestions"]) <= 3
        texts = [s["text"] for s in body["suggestions"]]
        assert len(set(texts)) == len(texts)
        confidences = [s["confidence"] for s in body["suggestions"]]
        assert confidences == sorted(confidences, reverse=True)
    payload = {"image_base64": base64.b64encode(image).decode(), "prompt": "a picture of"}
    async with http.post(server.url + "/v1/caption", json=payload) as response:
        body = await _json(response)
        assert response.status == 200 and body["caption"].startswith("a picture of")
    for bad in ({"suggestions": 9}, {"style": "baroque"}, {"num_beams": "lots"}, {"suggestions": True}):
        payload = {"image_base64": base64.b64encode(image).decode(), **bad}
        async with http.post(server.url + "/v1/caption", json=payload) as response:
            body = await _json(response)
            assert response.status == 400, body
            assert body["error"]["code"] in {"invalid_options", "invalid_field"}
    async with http.post(server.url + "/v1/caption", json={"image_base64": "", "sugestions": 2}) as response:
        body = await _json(response)
        assert response.status == 400 and body["error"]["code"] == "unknown_field"


async def test_the_batch_route_answers_in_order_with_per_image_errors(start_server, http) -> None:
    server = await start_server(cache_size=0)
    images = [encode(shapes_image(i)) for i in range(4)]
    singles = []
    for image in images:
        async with http.post(server.url + "/v1/caption", data=image) as response:
            singles.append((await response.json())["caption"])
    form = aiohttp.FormData()
    for image in [images[0], images[1], b"not an image", images[2], images[3]]:
        form.add_field("images", image, filename="x", content_type="application/octet-stream")
    async with http.post(server.url + "/v1/caption/batch", data=form) as response:
        body = await _json(response)
        assert response.status == 200, body
    results = body["results"]
    assert len(results) == 5
    assert results[2] == {
        "error": {"code": "unsupported_image_format", "message": results[2]["error"]["message"]},
        "status": 415,
    }
    assert [r["caption"] for i, r in enumerate(results) if i != 2] == singles
    assert body["request_id"] and body["model_version"] == server.state.service.model_version

    as_json = {"images": [{"image_base64": base64.b64encode(image).decode()} for image in images[:2]]}
    async with http.post(server.url + "/v1/caption/batch", json=as_json) as response:
        assert [r["caption"] for r in (await _json(response))["results"]] == singles[:2]


async def test_the_batch_route_limits_its_size_and_fails_whole_when_every_image_fails(
    start_server, http
) -> None:
    server = await start_server(max_batch_images=2)
    form = aiohttp.FormData()
    for _ in range(3):
        form.add_field("images", encode(shapes_image(0)), filename="x")
    async with http.post(server.url + "/v1/caption/batch", data=form) as response:
        body = await _json(response)
        assert response.status == 400 and body["error"]["code"] == "too_many_images"
    form = aiohttp.FormData()
    form.add_field("images", b"GIF89a broken", filename="x")
    async with http.post(server.url + "/v1/caption/batch", data=form) as response:
        body = await _json(response)
        assert response.status == 400 and body["error"]["code"] == "invalid_image"
    async with http.post(
        server.url + "/v1/caption/batch", data=b"raw", headers={"Content-Type": "image/png"}
    ) as r:
        assert r.status == 400 and (await _json(r))["error"]["code"] == "unsupported_body"


async def test_probes_models_openapi_and_unknown_routes(start_server, http) -> None:
    server = await start_server()
    async with http.get(server.url + "/healthz") as response:
        assert response.status == 200 and (await _json(response))["status"] == "ok"
    async with http.get(server.url + "/readyz") as response:
        assert response.status == 200 and (await _json(response))["ready"] is True
    async with http.get(server.url + "/v1/models") as response:
        (model,) = (await _json(response))["models"]
        assert model["version"] == server.state.service.model_version
        assert model["batching"]["max_batch_size"] == 8 and model["ready"] is True
    async with http.get(server.url + "/openapi.json") as response:
        document = await _json(response)
        assert document["openapi"].startswith("3.")
        assert {"/v1/caption", "/v1/caption/batch", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(
            document["paths"]
        )
        json.dumps(document)
    async with http.get(server.url + "/nowhere") as response:
        body = await _json(response)
        assert response.status == 404 and body["error"]["code"] == "not_found" and body["request_id"]
    async with http.get(server.url + "/v1/caption") as response:
        assert response.status == 405 and (await _json(response))["error"]["code"] == "method_not_allowed"


async def test_probe_and_scrape_lines_stay_out_of_the_info_log(
    start_server, http, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    with caplog.at_level(logging.INFO, logger="captionfleet.runtime.server.access"):
        for path in ("/healthz", "/readyz", "/metrics"):
            async with http.get(server.url + path) as response:
                assert response.status == 200
        async with http.post(server.url + "/v1/caption", data=encode(shapes_image(3))) as response:
            assert response.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "captionfleet.runtime.server.access"]
    assert lines == ["POST /v1/caption 200"]


async def test_metrics_count_requests_stages_and_model_info(start_server, http) -> None:
    server = await start_server()
    image = encode(shapes_image(4))
    for _ in range(2):
        async with http.post(server.url + "/v1/caption", data=image) as response:
            assert response.status == 200
    async with http.post(server.url + "/v1/caption", data=b"junk") as response:
        assert response.status == 415
    async with http.get(server.url + "/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    version = server.state.service.model_version
    for line in (
        'captionfleet_requests_total{code="200",route="/v1/caption"} 2.0',
        'captionfleet_requests_total{code="415",route="/v1/caption"} 1.0',
        f'captionfleet_cache_hits_total{{model="{version}"}} 1.0',
        f'captionfleet_cache_misses_total{{model="{version}"}} 1.0',
        f'captionfleet_model_info{{device="cpu",dtype="float32",model="{version}",name="tiny-blip"}} 1.0',
        "captionfleet_ready 1.0",
    ):
        assert line in text, line
    for histogram in (
        "request_duration_seconds",
        "queue_wait_seconds",
        "preprocess_seconds",
        "inference_seconds",
        "batch_size",
        "caption_confidence",
        "caption_length_words",
    ):
        assert f"captionfleet_{histogram}_count{{" in text, histogram
    assert f'captionfleet_queue_depth{{model="{version}"}} 0.0' in text
