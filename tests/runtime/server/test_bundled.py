"""Real captions from the bundled model, over real HTTP, on held-out synthetic scenes.

The scenes are ones the model captions correctly when called directly (through the engine, in
batches of another composition). Through the server, under concurrency and batching, each must
still get exactly its own caption: a mix-up between requests in a batch shows as a wrong caption.
"""

from __future__ import annotations

import asyncio
import io
import re

import aiohttp
import pytest
import torch
from PIL import Image

from captionfleet.runtime.engine.captioner import Captioner, bundled_model_dir, load_captioner
from captionfleet.runtime.engine.types import GenerationOptions
from captionfleet.runtime.server.testing import encode
from captionfleet.runtime.training.scenes import Scene, scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED
from captionfleet.settings.serve import ServeSettings

CONCURRENT = 64
SERVING_DEFAULTS = {"num_beams": 3, "max_new_tokens": 30}
"""The server's own defaults (the test servers' are smaller, for the tiny model)."""


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_captioner(str(bundled_model_dir()))


@pytest.fixture(scope="module")
def known_scenes(bundled: Captioner) -> list[Scene]:
    """Held-out scenes that the model, called directly through the engine, captions exactly right."""
    options = GenerationOptions(**SERVING_DEFAULTS)
    chosen: list[Scene] = []
    start = 0
    while len(chosen) < CONCURRENT:
        assert start < 10 * CONCURRENT, f"the model got only {len(chosen)} of {start} held-out scenes right"
        batch = [scene_at(HELD_OUT_SEED, index) for index in range(start, start + 16)]
        start += len(batch)
        captions = bundled.caption_images([scene.render() for scene in batch], options)
        chosen += [
            scene for scene, caption in zip(batch, captions, strict=True) if caption.text == scene.caption
        ]
    return chosen[:CONCURRENT]


async def _caption(http: aiohttp.ClientSession, base: str, data: bytes) -> dict:
    async with http.post(base + "/v1/caption", data=data) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def test_64_concurrent_scenes_each_get_their_own_correct_caption(
    start_server, http, bundled: Captioner, known_scenes: list[Scene]
) -> None:
    server = await start_server(captioner=bundled, cache_size=0, **SERVING_DEFAULTS)
    bodies = await asyncio.gather(*(_caption(http, server.url, encode(s.render())) for s in known_scenes))
    pairs = zip(known_scenes, bodies, strict=True)
    wrong = [(scene.caption, body["caption"]) for scene, body in pairs if body["caption"] != scene.caption]
    assert not wrong, wrong
    assert all(0 < body["confidence"] <= 1 and body["cached"] is False for body in bodies)
    async with http.get(server.url + "/metrics") as response:
        text = await response.text()
    version = re.escape(server.state.metrics.model)
    singles = float(
        re.search(rf'captionfleet_batch_size_bucket{{le="1.0",model="{version}"}} (\S+)', text)[1]
    )
    batches = float(re.search(rf'captionfleet_batch_size_count{{model="{version}"}} (\S+)', text)[1])
    images = float(re.search(rf'captionfleet_batch_size_sum{{model="{version}"}} (\S+)', text)[1])
    assert images == CONCURRENT
    assert batches - singles >= 1, "no batch held more than one image"
    assert batches < CONCURRENT


def _variants(image: Image.Image) -> dict[str, bytes]:
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    jpeg = encode(image, "JPEG", quality=85)
    return {
        "jpeg q85": jpeg,
        "png of the jpeg": encode(Image.open(io.BytesIO(jpeg)), "PNG"),
        "50 % png": encode(half, "PNG"),
        "50 % jpeg q85": encode(half, "JPEG", quality=85),
    }


async def _check_cache(http: aiohttp.ClientSession, first: str, second: str, scenes: list[Scene]) -> None:
    for scene in scenes:  # each distinct scene misses, though the cache holds all the ones before it
        original = await _caption(http, first, encode(scene.render()))
        assert original["cached"] is False and original["caption"] == scene.caption
        for name, data in _variants(scene.render()).items():
            again = await _caption(http, second, data)
            assert again["cached"] is True, (scene.caption, name)
            assert again["caption"] == scene.caption


async def test_scene_cache_hits_and_misses_in_memory(start_server, http, bundled, known_scenes) -> None:
    server = await start_server(captioner=bundled, **SERVING_DEFAULTS)
    await _check_cache(http, server.url, server.url, known_scenes[:16])


async def test_scene_cache_hits_and_misses_through_redis(
    start_server, http, bundled, known_scenes, redis_url: str
) -> None:
    version = f"bundled-{id(known_scenes)}"  # a namespace of this test's own in the shared Redis
    one = await start_server(
        captioner=bundled, redis_url=redis_url, model_version=version, **SERVING_DEFAULTS
    )
    two = await start_server(
        captioner=bundled, redis_url=redis_url, model_version=version, **SERVING_DEFAULTS
    )
    await _check_cache(http, one.url, two.url, known_scenes[16:32])


async def test_captionfleet_serve_serves_the_bundled_model_by_default(serve_process, known_scenes) -> None:
    process = serve_process(ServeSettings(torch_threads=2))  # no --model: the bundled one
    await asyncio.to_thread(process.wait_ready)
    scene = known_scenes[0]
    async with aiohttp.ClientSession() as http:
        body = await _caption(http, process.url, encode(scene.render()))
        models = await (await http.get(process.url + "/v1/models")).json()
    assert body["caption"] == scene.caption
    assert models["models"][0]["source"] == str(bundled_model_dir())
    process.terminate()
    assert await asyncio.to_thread(process.wait, 60) == 0
