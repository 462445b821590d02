"""Images of every kind a user may send, on every path: one answer for each image, whichever way it came.

Each image is sent as a raw body, a multipart field, JSON base64, a ``{"url"}`` to an image host on
loopback, in ``/v1/caption/batch``, and as an item of one job on a real redis-server (by value and by
URL). All must agree: the same caption (the result cache is off, so each path captions for itself) or
the same 4xx code. The images are made here
with Pillow: every PIL mode a file can carry, animations, multi-page files, strips, bombs that declare
billions of pixels in a few bytes, broken files, and documents that are not images.
"""

from __future__ import annotations

import base64
import io
import struct
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image, features

from captionfleet.runtime.engine.captioner import Captioner, bundled_model_dir, load_captioner
from captionfleet.runtime.server.testing import encode, free_port, png_bomb, serve_app, shapes_image
from captionfleet.runtime.training.scenes import scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED

from .test_jobs import finished, results, submit

OK = (200, None)
BROKEN = (400, "invalid_image")
TOO_LARGE = (400, "image_too_large")
NOT_AN_IMAGE = (415, "unsupported_image_format")


def _save(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _sixteen_bit_colour_png(channels: int) -> bytes:
    """A 16-bit RGB (colour type 2) or RGBA (6) PNG, which PIL cannot write itself."""
    pixels = np.zeros((32, 32, channels), dtype=">u2")
    pixels[..., 0] = 65535
    pixels[..., channels - 1] = 65535
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", 32, 32, 16, 2 if channels == 3 else 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _declaring(data: bytes, offset: int, size: bytes) -> bytes:
    """``data`` with its declared dimensions replaced (a bomb in a few bytes)."""
    return data[:offset] + size + data[offset + len(size) :]


def _modes(picture: Image.Image) -> dict[str, tuple[bytes, tuple[int, str | None]]]:
    grey = np.asarray(picture.convert("L"))
    half_transparent = np.array(picture.convert("RGBA"))
    half_transparent[:, : picture.width // 2, 3] = 0
    return {
        "png 1-bit": (_save(picture.convert("1"), "PNG"), OK),
        "png L": (_save(picture.convert("L"), "PNG"), OK),
        "png LA": (_save(picture.convert("LA"), "PNG"), OK),
        "png P": (_save(picture.convert("P"), "PNG"), OK),
        "png P with transparency": (_save(picture.quantize(8), "PNG", transparency=0), OK),
        "png RGBA": (_save(Image.fromarray(half_transparent), "PNG"), OK),
        "png I;16": (_save(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), OK),
        "png 16-bit RGB": (_sixteen_bit_colour_png(3), OK),
        "png 16-bit RGBA": (_sixteen_bit_colour_png(4), OK),
        "tiff I (32-bit)": (_save(Image.fromarray(grey.astype(np.int32) * 257, mode="I"), "TIFF"), OK),
        "tiff F": (_save(Image.fromarray(grey.astype(np.float32) / 255, mode="F"), "TIFF"), OK),
        "tiff I;16": (_save(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"), OK),
        "tiff CMYK": (_save(picture.convert("CMYK"), "TIFF"), OK),
        "tiff LAB": (_save(picture.convert("LAB"), "TIFF"), OK),
        "tiff jpeg-compressed": (_save(picture, "TIFF", compression="jpeg"), OK),
        "jpeg CMYK": (_save(picture.convert("CMYK"), "JPEG"), OK),
        "jpeg grey": (_save(picture.convert("L"), "JPEG"), OK),
        "jpeg progressive": (_save(picture, "JPEG", progressive=True), OK),
        "bmp": (_save(picture, "BMP"), OK),
        "bmp 1-bit": (_save(picture.convert("1"), "BMP"), OK),
    }


def _animations_and_shapes(picture: Image.Image) -> dict[str, tuple[bytes, tuple[int, str | None]]]:
    frames = [shapes_image(index, 64) for index in range(150)]
    exif = Image.Exif()
    exif[0x0112] = 6
    avif = {"avif": (_save(picture, "AVIF"), OK)} if features.check("avif") else {}
    return avif | {
        "jpeg exif-rotated": (_save(picture, "JPEG", exif=exif), OK),
        "webp lossy": (_save(picture, "WEBP", quality=80), OK),
        "webp lossless": (_save(picture, "WEBP", lossless=True), OK),
        "webp animated": (
            _save(picture, "WEBP", save_all=True, append_images=[shapes_image(i, 128) for i in range(4)]),
            OK,
        ),
        "gif of 150 frames": (_save(frames[0], "GIF", save_all=True, append_images=frames[1:]), OK),
        "tiff of 2 pages": (_save(picture, "TIFF", save_all=True, append_images=frames[:1]), OK),
        "1x1": (encode(Image.new("RGB", (1, 1), (200, 10, 10))), OK),
        "1x300": (encode(Image.new("RGB", (1, 300), (200, 10, 10))), OK),
        "20000x20 strip": (encode(Image.new("RGB", (20000, 20), (10, 10, 200))), OK),
        "20x20000 jpeg strip": (encode(Image.new("RGB", (20, 20000), (10, 10, 200)), "JPEG"), OK),
        "png followed by garbage": (encode(picture) + b"garbage" * 100, OK),
    }


def _refused() -> dict[str, tuple[bytes, tuple[int, str | None]]]:
    png, gif = encode(shapes_image(2)), _save(Image.new("P", (2, 2)), "GIF")
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    start_of_frame = jpeg.index(b"\xff\xc0")
    webp = _save(shapes_image(2), "WEBP")
    return {
        "png bomb (400 MP)": (png_bomb(), TOO_LARGE),
        "gif declaring 65535x65535": (_declaring(gif, 6, struct.pack("<HH", 65535, 65535)), TOO_LARGE),
        "jpeg declaring 60000x60000": (
            _declaring(jpeg, start_of_frame + 5, struct.pack(">HH", 60000, 60000)),
            TOO_LARGE,
        ),
        "zero bytes": (b"", BROKEN),
        "truncated png": (png[: len(png) // 2], BROKEN),
        "truncated webp": (webp[: len(webp) // 2], BROKEN),
        "jpeg cut inside its header": (jpeg[:100], BROKEN),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"></svg>', NOT_AN_IMAGE),
        "html": (b"<!doctype html><html><body>a cat</body></html>", NOT_AN_IMAGE),
        "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", NOT_AN_IMAGE),
        "ico": (_save(shapes_image(2), "ICO"), NOT_AN_IMAGE),
        "ppm": (_save(shapes_image(2), "PPM"), NOT_AN_IMAGE),
        "riff that is not webp": (b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\0" * 40, NOT_AN_IMAGE),
    }  # fmt: skip


def corpus() -> dict[str, tuple[bytes, tuple[int, str | None]]]:
    picture = shapes_image(3, 128)
    return _modes(picture) | _animations_and_shapes(picture) | _refused()


CORPUS = corpus()


@pytest.fixture
def stream() -> str:
    return f"test-image-paths:{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    return load_captioner(str(bundled_model_dir()))


@pytest.fixture
async def image_host() -> AsyncIterator[str]:
    """Serves the corpus on loopback: ``{base}/{name}``."""
    by_slug = {name.replace(" ", "_"): data for name, (data, _) in CORPUS.items()}

    async def image(request: web.Request) -> web.Response:
        if request.match_info["slug"] not in by_slug:
            raise web.HTTPNotFound()
        return web.Response(body=by_slug[request.match_info["slug"]], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{slug}", image)
    runner, port = await serve_app(app)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _answer(status: int, body: dict[str, Any]) -> tuple[int, str]:
    """What a path said: the caption, or the error code (the status is checked by the caller)."""
    if status == 200:
        return (200, body["caption"])
    return (status, body["error"]["code"])


async def _direct_answers(http: aiohttp.ClientSession, base: str, data: bytes, url: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename="upload.bin", content_type="application/octet-stream")
    requests = {
        "raw": {"data": data, "headers": {"Content-Type": "application/octet-stream"}},
        "multipart": {"data": form},
        "base64": {"json": {"image_base64": base64.b64encode(data).decode()}},
        "url": {"json": {"url": url}},
    }
    answers = {}
    for path, arguments in requests.items():
        async with http.post(base + "/v1/caption", **arguments) as response:
            assert response.content_type == "application/json", (path, await response.text())
            answers[path] = _answer(response.status, await response.json())
    return answers


async def _batch_disagreements(
    http: aiohttp.ClientSession, base: str, direct: dict[str, tuple[int, str]]
) -> dict[str, Any]:
    """``POST /v1/caption/batch`` with the corpus, 16 images a call: each result (or per-image error)
    against the image's own direct answer."""
    names, wrong = list(CORPUS), {}
    for start in range(0, len(names), 16):
        chunk = names[start : start + 16]
        form = aiohttp.FormData()
        for name in chunk:
            form.add_field("images", CORPUS[name][0], filename=f"{name}.bin")
        async with http.post(base + "/v1/caption/batch", data=form) as response:
            body = await response.json()
        answers = body.get("results")
        if response.status != 200:  # only when every image failed: the first one's error answers
            if any(direct[name][0] == 200 for name in chunk):
                wrong[f"batch from {chunk[0]}"] = body
            chunk, answers = chunk[:1], [{"error": body["error"], "status": response.status}]
        for name, answer in zip(chunk, answers, strict=True):
            got = (
                (200, answer["caption"])
                if "caption" in answer
                else (answer["status"], answer["error"]["code"])
            )
            if got != direct[name]:
                wrong[f"batch: {name}"] = (got, direct[name])
    return wrong


async def test_every_image_gets_one_answer_on_every_path(
    start_server, http, redis_url: str, stream: str, image_host: str
) -> None:
    server = await start_server(
        allow_private_urls=True, cache_size=0, jobs_redis_url=redis_url, jobs_stream=stream
    )
    by_value = [
        {"id": name, "image_base64": base64.b64encode(data).decode()} for name, (data, _) in CORPUS.items()
    ]
    by_url = [{"id": name, "url": f"{image_host}/{name.replace(' ', '_')}"} for name in CORPUS]
    created = await submit(http, server.url, {"items": by_value + by_url})
    wrong: dict[str, Any] = {}
    direct: dict[str, tuple[int, str]] = {}
    for name, (data, (status, code)) in CORPUS.items():
        answers = await _direct_answers(http, server.url, data, f"{image_host}/{name.replace(' ', '_')}")
        direct[name] = answers["raw"]
        if (
            direct[name][0] != status
            or direct[name][1] != (code or direct[name][1])
            or len(set(answers.values())) > 1
        ):
            wrong[name] = answers
    wrong |= await _batch_disagreements(http, server.url, direct)
    await finished(http, server.url, created["id"])
    for line in await results(http, server.url, created["id"]):
        expected = direct[line["id"]]
        got = (200, line["result"]["caption"]) if "result" in line else (expected[0], line["error"]["code"])
        if got != expected:
            wrong[f"job item {line['index']}: {line['id']}"] = (got, expected)
    assert not wrong


async def test_urls_that_fail_get_one_answer_directly_and_as_job_items(
    start_server, http, redis_url: str, stream: str, image_host: str
) -> None:
    server = await start_server(allow_private_urls=True, jobs_redis_url=redis_url, jobs_stream=stream)
    urls = {
        "not found": f"{image_host}/no-such-image",
        "nobody listening": f"http://127.0.0.1:{free_port()}/cat.png",
        "not http": "ftp://127.0.0.1/cat.png",
        "a document": f"{image_host}/html",
    }
    direct = {}
    for name, url in urls.items():
        async with http.post(server.url + "/v1/caption", json={"url": url}) as response:
            body = await response.json()
            assert 400 <= response.status < 500 or response.status in (502, 504), body
            direct[name] = body["error"]["code"]
    created = await submit(
        http, server.url, {"items": [{"id": name, "url": url} for name, url in urls.items()]}
    )
    await finished(http, server.url, created["id"])
    assert {
        line["id"]: line["error"]["code"] for line in await results(http, server.url, created["id"])
    } == direct


def _base64_with_every_special_character() -> tuple[bytes, str]:
    """A PNG whose standard base64 holds '+', '/' and padding, so each way of writing it differs."""
    noise = np.random.default_rng(0)
    for side in range(8, 64):
        data = encode(Image.fromarray(noise.integers(0, 256, (side, side, 3), dtype=np.uint8)))
        text = base64.b64encode(data).decode()
        if "+" in text and "/" in text and text.endswith("="):
            return data, text
    raise AssertionError("no such noise image")


@pytest.mark.parametrize(
    "coding",
    ["lines of 76", "spaces", "url-safe alphabet", "no padding", "data URL"],
)
async def test_base64_as_encoders_write_it_is_the_same_image(coding: str, start_server, http) -> None:
    server = await start_server(cache_size=0)
    data, text = _base64_with_every_special_character()
    written = {
        "lines of 76": "\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
        "spaces": " ".join(text[i : i + 10] for i in range(0, len(text), 10)),
        "url-safe alphabet": base64.urlsafe_b64encode(data).decode(),
        "no padding": text.rstrip("="),
        "data URL": "data:image/png;base64," + text,
    }[coding]
    async with http.post(server.url + "/v1/caption", data=data) as response:
        expected = (await response.json())["caption"]
    async with http.post(server.url + "/v1/caption", json={"image_base64": written}) as response:
        body = await response.json()
        assert response.status == 200, body
        assert body["caption"] == expected


async def test_a_data_url_given_as_url_says_where_it_belongs(start_server, http) -> None:
    server = await start_server()
    async with http.post(
        server.url + "/v1/caption", json={"url": "data:image/png;base64," + base64.b64encode(b"x").decode()}
    ) as response:
        body = await response.json()
        assert response.status == 400 and body["error"]["code"] == "url_refused"
        assert "image_base64" in body["error"]["message"]


@pytest.mark.parametrize("orientation", [6, 8, 3])
async def test_an_exif_rotated_scene_gets_the_caption_of_what_it_shows(
    orientation: int, bundled: Captioner, start_server, http
) -> None:
    """The bundled model reads "above" / "to the left of": on the sensor's unturned pixels it would
    name the other relation (or the other shape first)."""
    scene = next(
        scene_at(HELD_OUT_SEED, index) for index in range(50) if scene_at(HELD_OUT_SEED, index).relation
    )
    upright = scene.render(256)
    stored = upright.transpose(
        {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[
            orientation
        ]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    server = await start_server(captioner=bundled, cache_size=0, num_beams=3, max_new_tokens=30)
    async with http.post(server.url + "/v1/caption", data=encode(stored, "JPEG", quality=92, exif=exif)) as r:
        turned = (await r.json())["caption"]
    async with http.post(server.url + "/v1/caption", data=encode(stored, "JPEG", quality=92)) as r:
        unturned = (await r.json())["caption"]
    assert turned == scene.caption
    assert unturned != scene.caption


async def test_moderation_judges_every_decodable_image_and_never_sees_the_rest(
    start_server, http, moderation_service
) -> None:
    """Moderation sees the decoded picture (any mode, any shape: a 20000x20 strip too) as a JPEG of at
    most 512 px; an image that does not decode gets its own 4xx and never reaches the service."""
    server = await start_server(
        moderation_url=moderation_service.url, moderation_allow_private=True, moderation_cache_size=0
    )
    wrong = {}
    for name, (data, (status, code)) in CORPUS.items():
        calls = moderation_service.calls
        async with http.post(server.url + "/v1/caption", data=data) as response:
            body = await response.json()
            got = (response.status, body["error"]["code"] if "error" in body else None)
        judged = moderation_service.calls - calls
        # The service blocks mostly-red images: these are (the GIF's first frame is shapes_image(0)).
        red = name in ("1x1", "1x300", "png 16-bit RGBA", "gif of 150 frames")
        expected = ((422, "content_blocked") if red else OK, 1) if status == 200 else ((status, code), 0)
        if (got, judged) != expected:
            wrong[name] = (got, judged)
    assert not wrong
    assert max(max(size) for size in moderation_service.sizes) <= 512
