"""The bad-input corpus over real HTTP: each case gets its documented status and a JSON error (or a
caption, for odd but valid images), and the server stays healthy afterwards."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from captionfleet.runtime.server.testing import encode, png_bomb, shapes_image

MB = 1024 * 1024


def cmyk_jpeg() -> bytes:
    return _save(shapes_image(5).convert("CMYK"), "JPEG")


def _save(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    return _save(image, "PNG")


def palette_png_with_transparency() -> bytes:
    palette = shapes_image(6).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return _save(palette, "PNG", transparency=0)


def animated_gif() -> bytes:
    first, second = shapes_image(7), shapes_image(8)
    return _save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


@dataclass
class Case:
    status: int
    code: str | None = None
    data: bytes | None = None
    json: dict[str, Any] | None = None
    form_field: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def corpus() -> dict[str, Case]:
    photo = encode(shapes_image(9), "JPEG", quality=90)
    return {
        "zero bytes": Case(400, "invalid_image", data=b"", headers={"Content-Type": "image/jpeg"}),
        "text": Case(415, "unsupported_image_format", data=b"hello, world\n" * 20,
                     headers={"Content-Type": "text/plain"}),
        "html claiming to be png": Case(415, "unsupported_image_format", data=b"<html></html>",
                                        headers={"Content-Type": "image/png"}),
        "truncated jpeg": Case(400, "invalid_image", data=photo[: len(photo) // 2]),
        "decompression bomb": Case(400, "image_too_large", data=png_bomb()),
        "cmyk jpeg": Case(200, data=cmyk_jpeg()),
        "16-bit png": Case(200, data=sixteen_bit_png()),
        "palette png with transparency": Case(200, data=palette_png_with_transparency()),
        "animated gif": Case(200, data=animated_gif()),
        "webp": Case(200, data=_save(shapes_image(10), "WEBP")),
        "bmp": Case(200, data=_save(shapes_image(11), "BMP")),
        "tiff": Case(200, data=_save(shapes_image(12), "TIFF")),
        "ico is not accepted": Case(415, "unsupported_image_format", data=_save(shapes_image(13), "ICO")),
        "wrong field name": Case(400, "missing_image", data=photo, form_field="file"),
        "malformed json": Case(400, "invalid_json", data=b'{"url": ',
                               headers={"Content-Type": "application/json"}),
        "multipart without a boundary": Case(400, "invalid_multipart", data=b"--x\r\n\r\n",
                                             headers={"Content-Type": "multipart/form-data"}),
        "multipart cut short": Case(400, "invalid_multipart", data=b"--b\r\nContent-Disposition: form-da",
                                    headers={"Content-Type": "multipart/form-data; boundary=b"}),
        "url is not a string": Case(400, "invalid_field", json={"url": 42}),
        "two sources": Case(400, "missing_image", json={"url": "https://x.example/a", "image_base64": "AA"}),
        "json not an object": Case(400, "invalid_json", json=["http://example.com/x.png"]),  # type: ignore[arg-type]
        "bad base64": Case(400, "invalid_base64", json={"image_base64": "!!!not base64!!!"}),
        "base64 of text": Case(415, "unsupported_image_format",
                               json={"image_base64": base64.b64encode(b"just text").decode()}),
        "file url": Case(400, "url_refused", json={"url": "file:///etc/passwd"}),
        "ftp url": Case(400, "url_refused", json={"url": "ftp://example.com/cat.png"}),
        "loopback url": Case(400, "url_refused", json={"url": "http://127.0.0.1:8080/v1/models"}),
        "localhost url": Case(400, "url_refused", json={"url": "http://localhost/cat.png"}),
        "metadata url": Case(400, "url_refused", json={"url": "http://169.254.169.254/latest/meta-data/"}),
        "ipv6 loopback url": Case(400, "url_refused", json={"url": "http://[::1]/cat.png"}),
        "private url": Case(400, "url_refused", json={"url": "http://10.1.2.3/cat.png"}),
        "relative url": Case(400, "url_refused", json={"url": "/cat.png"}),
    }  # fmt: skip


CORPUS = corpus()


async def _post(http: aiohttp.ClientSession, url: str, case: Case) -> aiohttp.ClientResponse:
    if case.json is not None:
        return await http.post(url, json=case.json)
    if case.form_field is not None:
        form = aiohttp.FormData()
        form.add_field(case.form_field, case.data or b"", filename="photo.jpg", content_type="image/jpeg")
        return await http.post(url, data=form)
    return await http.post(url, data=case.data, headers=case.headers)


async def _assert_healthy(http: aiohttp.ClientSession, base: str) -> None:
    async with http.get(base + "/healthz") as response:
        assert response.status == 200
    async with http.get(base + "/readyz") as response:
        assert response.status == 200
    async with http.post(base + "/v1/caption", data=encode(shapes_image(0))) as response:
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("name", list(CORPUS))
async def test_bad_input_gets_its_documented_answer(name: str, start_server, http) -> None:
    server = await start_server()
    case = CORPUS[name]
    async with await _post(http, server.url + "/v1/caption", case) as response:
        body = await response.json()
        assert response.status == case.status, body
        assert response.content_type == "application/json"
        if case.status == 200:
            assert isinstance(body["caption"], str) and 0 < body["confidence"] <= 1  # tiny model: may be ""
        else:
            assert (
                set(body) == {"error", "request_id"}
                and body["request_id"] == response.headers["X-Request-Id"]
            )
            assert body["error"]["code"] == case.code and body["error"]["message"]
    await _assert_healthy(http, server.url)


async def _chunks(total: int, size: int = MB) -> AsyncIterator[bytes]:
    chunk = b"\0" * size
    for _ in range(total // size):
        yield chunk


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_50_mb_body_gets_413_without_being_read_into_memory(
    declared: bool, start_server, http
) -> None:
    server = await start_server()
    data: bytes | AsyncIterator[bytes] = b"\xff\xd8\xff" + b"\0" * (50 * MB) if declared else _chunks(50 * MB)
    try:
        async with http.post(
            server.url + "/v1/caption", data=data, headers={"Content-Type": "image/jpeg"}
        ) as r:
            body = await r.json()
            assert r.status == 413, body
            assert body["error"]["code"] == "payload_too_large"
    except aiohttp.ClientOSError:
        # The server may answer and close before the client has sent everything; the answer is
        # then lost on some platforms. The metrics still show the 413.
        pass
    async with http.get(server.url + "/metrics") as response:
        assert 'captionfleet_requests_total{code="413",route="/v1/caption"} 1.0' in await response.text()
    await _assert_healthy(http, server.url)


async def test_an_exif_rotated_photo_is_captioned_upright(start_server, http) -> None:
    server = await start_server()
    photo = shapes_image(14, size=128)
    upright = photo.transpose(Image.Transpose.ROTATE_270)  # what EXIF orientation 6 displays
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _save(photo, "JPEG", quality=95, exif=exif)
    async with http.post(server.url + "/v1/caption", data=encode(upright)) as response:
        assert (await response.json())["cached"] is False
    async with http.post(server.url + "/v1/caption", data=tagged) as response:
        body = await response.json()
        assert response.status == 200 and body["cached"] is True, body  # the same picture, once turned
    async with http.post(server.url + "/v1/caption", data=encode(photo)) as response:
        assert (await response.json())["cached"] is False  # unturned it is another picture


async def test_the_body_size_limit_is_a_setting(start_server, http) -> None:
    server = await start_server(max_body_bytes=1000)
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    async with http.post(server.url + "/v1/caption", data=encode(Image.fromarray(noise))) as response:
        assert response.status == 413
    form = aiohttp.FormData()
    form.add_field("image", b"\0" * 2000, filename="x.png")
    async with http.post(server.url + "/v1/caption", data=form) as response:
        assert response.status == 413
