"""The result cache: its perceptual+colour image key, the in-memory LRU, Redis, and hits over HTTP."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from PIL import Image, ImageDraw

from captionfleet.runtime.engine.types import Caption, GenerationOptions, Suggestion
from captionfleet.runtime.server.testing import encode, shapes_image
from captionfleet.runtime.serving.cache import CacheLookup, MemoryCache, RedisCache
from captionfleet.runtime.serving.image_key import ImageKey, image_key, same_image
from captionfleet.runtime.training.scenes import scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED


def _reload(data: bytes) -> Image.Image:
    import io

    return Image.open(io.BytesIO(data)).convert("RGB")


def variants(image: Image.Image) -> dict[str, Image.Image]:
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    return {
        "jpeg q85": _reload(encode(image, "JPEG", quality=85)),
        "png of jpeg": _reload(encode(_reload(encode(image, "JPEG", quality=85)), "PNG")),
        "50 %": _reload(encode(half, "PNG")),
        "50 % jpeg q85": _reload(encode(half, "JPEG", quality=85)),
        "jpeg at Pillow's default quality (75)": _reload(encode(image, "JPEG")),
        "webp q80": _reload(encode(image, "WEBP", quality=80)),
        "200 % jpeg q85": _reload(
            encode(image.resize((image.width * 2, image.height * 2)), "JPEG", quality=85)
        ),
    }


def matches(stored: ImageKey, query: ImageKey) -> bool:
    return stored.bucket in query.probes() and same_image(stored.signature, query.signature)


def circle(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(image).ellipse([20, 30, 90, 100], fill=colour)
    return image


def test_reencoded_and_resized_images_keep_their_key() -> None:
    for index in range(30):
        original = shapes_image(index, size=192)
        key = image_key(original)
        for name, variant in variants(original).items():
            assert matches(key, image_key(variant)), (index, name)


def test_distinct_images_get_distinct_keys() -> None:
    keys = [image_key(shapes_image(index, size=192)) for index in range(30)]
    for i, first in enumerate(keys):
        for j, second in enumerate(keys):
            assert (i == j) == matches(first, second), (i, j)


def test_synthetic_scenes_every_distinct_scene_misses_and_every_reencoding_hits() -> None:
    scenes = [scene_at(HELD_OUT_SEED, index) for index in range(150)]
    keys = [image_key(scene.render()) for scene in scenes]
    for scene, key in zip(scenes, keys, strict=True):
        for name, variant in variants(scene.render()).items():
            assert matches(key, image_key(variant)), (scene.caption, name)
    for i, first in enumerate(keys):
        for j in range(i + 1, len(keys)):
            assert not matches(first, keys[j]), (scenes[i].caption, scenes[j].caption)


def test_images_that_differ_only_in_colour_do_not_match() -> None:
    red, green = circle((255, 0, 0)), circle((0, 130, 0))
    assert (
        red.convert("L").tobytes() == green.convert("L").tobytes()
    )  # a luminance hash cannot tell them apart
    assert not matches(image_key(red), image_key(green))
    assert not matches(image_key(circle((255, 0, 0))), image_key(circle((255, 140, 0))))  # red vs orange


CAPTION = Caption("a red square", 0.8, (Suggestion("a red square", 0.8), Suggestion("a red box", 0.5)))
OPTIONS = GenerationOptions()


def _lookup(index: int, options: GenerationOptions = OPTIONS, version: str = "v1") -> CacheLookup:
    return CacheLookup.of(version, options, image_key(shapes_image(index, size=192)))


class ManualClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


async def test_memory_cache_hits_misses_and_namespaces() -> None:
    cache = MemoryCache(max_entries=100, ttl_s=60)
    await cache.put(_lookup(1), CAPTION)
    assert await cache.get(_lookup(1)) == CAPTION
    reencoded = CacheLookup.of("v1", OPTIONS, image_key(variants(shapes_image(1, size=192))["50 % jpeg q85"]))
    assert await cache.get(reencoded) == CAPTION
    assert await cache.get(_lookup(2)) is None
    assert await cache.get(_lookup(1, GenerationOptions(suggestions=2, num_beams=3))) is None
    assert await cache.get(_lookup(1, version="v2")) is None


async def test_memory_cache_expires_and_evicts_the_least_recently_used() -> None:
    clock = ManualClock()
    cache = MemoryCache(max_entries=3, ttl_s=10, clock=clock)
    for index in range(3):
        await cache.put(_lookup(index), CAPTION)
    assert await cache.get(_lookup(0)) == CAPTION  # 0 is now the most recently used
    await cache.put(_lookup(3), CAPTION)
    assert len(cache) == 3
    assert await cache.get(_lookup(1)) is None  # evicted
    assert await cache.get(_lookup(0)) == CAPTION
    clock.now += 11
    assert await cache.get(_lookup(0)) is None


def _square_at(x: int, y: int) -> Image.Image:
    image = Image.new("RGB", (256, 256), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([x, y, x + 40, y + 40], fill=(200, 30, 30))
    return image


async def test_different_images_in_one_bucket_are_told_apart_by_their_signatures() -> None:
    left, right = image_key(_square_at(10, 20)), image_key(_square_at(70, 60))
    assert left.bucket == right.bucket and not same_image(left.signature, right.signature)
    cache = MemoryCache(max_entries=10, ttl_s=60)
    other = Caption("a square lower down", 0.7, (Suggestion("a square lower down", 0.7),))
    await cache.put(CacheLookup.of("v1", OPTIONS, left), CAPTION)
    await cache.put(CacheLookup.of("v1", OPTIONS, right), other)
    assert len(cache) == 2
    assert await cache.get(CacheLookup.of("v1", OPTIONS, left)) == CAPTION
    assert await cache.get(CacheLookup.of("v1", OPTIONS, right)) == other


def test_lookups_probe_the_neighbouring_bucket_near_a_step_boundary() -> None:
    below = ImageKey(features=(31.5, 100.0, 100.0, 100.0, 120.0, 120.0), signature=b"")
    above = ImageKey(features=(32.5, 100.0, 100.0, 100.0, 120.0, 120.0), signature=b"")
    assert below.bucket != above.bucket
    assert above.bucket in below.probes() and below.bucket in above.probes()
    middle = ImageKey(features=(48.0, 112.0, 80.0, 16.0, 120.0, 104.0), signature=b"")
    assert middle.probes() == [middle.bucket]


async def test_redis_cache_is_shared_and_expires(redis_url: str) -> None:
    first, second = RedisCache(redis_url, ttl_s=30), RedisCache(redis_url, ttl_s=30)
    try:
        lookup = _lookup(4, version="redis-test")
        assert await second.get(lookup) is None
        await first.put(lookup, CAPTION)
        assert await second.get(lookup) == CAPTION
        client = redis.asyncio.Redis.from_url(redis_url)
        assert 0 < await client.pttl(lookup.home) <= 30_000
        await client.aclose()
        assert await second.get(_lookup(5, version="redis-test")) is None
        assert first.errors == second.errors == 0
    finally:
        await first.close()
        await second.close()


async def test_a_redis_that_is_down_means_misses_not_errors() -> None:
    from captionfleet.runtime.server.testing import free_port

    cache = RedisCache(f"redis://:hunter2@127.0.0.1:{free_port()}/0", ttl_s=30, timeout_s=0.2)
    try:
        assert await cache.get(_lookup(1)) is None
        await cache.put(_lookup(1), CAPTION)
        assert cache.errors == 2
        assert "hunter2" not in cache.url
    finally:
        await cache.close()


async def _caption(http, base: str, data: bytes, query: str = "") -> dict:
    async with http.post(base + "/v1/caption" + query, data=data) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def test_over_http_reencoded_images_hit_and_distinct_ones_miss(start_server, http) -> None:
    server = await start_server()
    original = shapes_image(20, size=192)
    first = await _caption(http, server.url, encode(original))
    assert first["cached"] is False
    for name, variant in variants(original).items():
        again = await _caption(http, server.url, encode(variant, "JPEG", quality=95))
        assert again["cached"] is True, name
        assert (again["caption"], again["suggestions"]) == (first["caption"], first["suggestions"])
    assert (await _caption(http, server.url, encode(shapes_image(21, size=192))))["cached"] is False
    assert (await _caption(http, server.url, encode(original), "?suggestions=2"))["cached"] is False


async def test_a_body_seen_before_is_not_decoded_again(
    start_server, http, monkeypatch, tiny_captioner
) -> None:
    from captionfleet.runtime.engine import preprocess

    rule = tiny_captioner.preprocessor

    decoded: list[int] = []
    real_decode = preprocess.decode_image

    def counting_decode(data: bytes, **kwargs: object) -> Image.Image:
        decoded.append(len(data))
        # The server decodes by the preprocessor's draft rule, the one its tolerance was measured for.
        assert (kwargs["draft_size"], kwargs["max_draft_reduction"]) == (rule.draft_size, 4)
        return real_decode(data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(preprocess, "decode_image", counting_decode)
    server = await start_server()
    body = encode(shapes_image(24, size=192))
    first = await _caption(http, server.url, body)
    assert (first["cached"], len(decoded)) == (False, 1)
    for _ in range(3):
        again = await _caption(http, server.url, body)
        assert (again["cached"], again["caption"]) == (True, first["caption"])
    assert len(decoded) == 1  # the same bytes: the key came from the memo, nothing was decoded
    # Other options miss the cache; the image is decoded then (once) to be captioned.
    other = await _caption(http, server.url, body, "?suggestions=2")
    assert (other["cached"], other["caption"], len(decoded)) == (False, first["caption"], 2)
    # A re-encoding is new bytes: decoded, and still a perceptual hit.
    assert (await _caption(http, server.url, encode(shapes_image(24, size=192), "JPEG", quality=90)))[
        "cached"
    ]
    assert len(decoded) == 3


async def test_over_http_replicas_share_hits_through_redis(start_server, http, redis_url: str) -> None:
    one = await start_server(redis_url=redis_url, model_version="shared-v1")
    two = await start_server(redis_url=redis_url, model_version="shared-v1")
    other_version = await start_server(redis_url=redis_url, model_version="shared-v2")
    image = shapes_image(22, size=192)
    first = await _caption(http, one.url, encode(image))
    assert first["cached"] is False
    hit = await _caption(http, two.url, encode(image, "JPEG", quality=85))
    assert hit["cached"] is True and hit["caption"] == first["caption"]
    assert (await _caption(http, other_version.url, encode(image)))["cached"] is False
    models = await (await http.get(two.url + "/v1/models")).json()
    assert models["models"][0]["cache"] == "redis"


async def test_cache_size_zero_turns_caching_off(start_server, http) -> None:
    server = await start_server(cache_size=0)
    image = encode(shapes_image(23))
    results = await asyncio.gather(*(_caption(http, server.url, image) for _ in range(2)))
    assert [r["cached"] for r in results] == [False, False]


@pytest.mark.parametrize("index", range(3))
def test_keys_are_deterministic(index: int) -> None:
    assert image_key(shapes_image(index)) == image_key(shapes_image(index))
