"""Decoding untrusted bytes: formats sniffed from content, every PIL mode to RGB, bombs and junk refused."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image

from captionfleet.runtime.engine.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from captionfleet.runtime.engine.images import decode_image, open_image, sniff_format, to_rgb

LIMIT = 50_000_000
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    xs = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    ys = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    pixels = np.concatenate(
        [
            np.broadcast_to(xs, (height, width, 1)),
            np.broadcast_to(ys, (height, width, 1)),
            np.full((height, width, 1), 90),
        ],
        axis=2,
    )
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but which holds no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # a few bytes where width * height * 3 are due
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("fmt", "params", "lossy"),
    [
        ("JPEG", {"quality": 95}, True),
        ("PNG", {}, False),
        ("WEBP", {"lossless": True}, False),
        ("BMP", {}, False),
        ("TIFF", {}, False),
        ("GIF", {}, True),  # palette quantisation
    ],
)
def test_each_allowed_format_decodes_to_the_same_rgb_picture(
    fmt: str, params: dict[str, Any], lossy: bool
) -> None:
    original = gradient()
    decoded = decode_image(encode(original, fmt, **params), max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.size == original.size
    difference = np.abs(np.asarray(decoded, dtype=np.int16) - np.asarray(original, dtype=np.int16))
    assert difference.mean() < (8 if lossy else 1e-9)


def test_mpo_is_accepted_as_jpeg() -> None:
    data = encode(
        Image.new("RGB", (40, 30), RED),
        "MPO",
        save_all=True,
        append_images=[Image.new("RGB", (40, 30), BLUE)],
    )
    assert open_image(data, max_pixels=LIMIT).format == "MPO"
    decoded = decode_image(data, max_pixels=LIMIT)
    assert close_to(pixel(decoded, (20, 15)), RED, 8)  # the first picture


def test_format_is_sniffed_from_the_content_and_limited_to_the_allowed_set() -> None:
    png = encode(gradient(), "PNG")
    with pytest.raises(UnsupportedImageFormat, match="JPEG"):
        decode_image(png, max_pixels=LIMIT, allowed_formats={"JPEG"})
    assert sniff_format(png) == "PNG"
    assert sniff_format(encode(gradient(), "WEBP")) == "WEBP"
    assert sniff_format(b"hello") is None


@pytest.mark.parametrize(
    "data",
    [
        b"a caption please\n",
        b"<!doctype html><html><body>not an image</body></html>",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        b'{"url": "http://example.com/cat.jpg"}',
    ],
    ids=["text", "html", "pdf", "json"],
)
def test_content_that_is_not_an_image_is_an_unsupported_format(data: bytes) -> None:
    with pytest.raises(UnsupportedImageFormat) as caught:
        decode_image(data, max_pixels=LIMIT)
    assert caught.value.code == "unsupported_image_format"


@pytest.mark.parametrize(("fmt", "params"), [("ICO", {}), ("PPM", {}), ("TGA", {}), ("JPEG2000", {})])
def test_real_images_in_formats_outside_the_allowed_set_are_unsupported(
    fmt: str, params: dict[str, Any]
) -> None:
    with pytest.raises(UnsupportedImageFormat):
        decode_image(encode(gradient(32, 32), fmt, **params), max_pixels=LIMIT)


def test_empty_bytes_are_an_invalid_image() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_images_are_invalid(fmt: str) -> None:
    data = encode(gradient(200, 150), fmt)
    with pytest.raises(InvalidImage) as caught:
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)
    assert caught.value.code == "invalid_image"


def test_allowed_magic_numbers_followed_by_junk_are_invalid_not_unsupported() -> None:
    with pytest.raises(InvalidImage, match="JPEG"):
        decode_image(b"\xff\xd8\xff" + b"\x00junk" * 20, max_pixels=LIMIT)
    with pytest.raises(InvalidImage):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"junk" * 20, max_pixels=LIMIT)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The header claims 8000 x 8000 but the file holds no pixel data: decoding it would fail as
    # truncated, so ImageTooLarge proves the check came first.
    data = png_header(8000, 8000)
    with pytest.raises(ImageTooLarge, match="64000000"):
        decode_image(data, max_pixels=10_000_000)
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=64_000_000)  # within the limit: now it is just broken


def test_pils_decompression_bomb_error_and_warning_become_image_too_large() -> None:
    with pytest.raises(ImageTooLarge):  # over twice PIL's limit: PIL raises inside Image.open
        decode_image(png_header(20_000, 20_000), max_pixels=10**12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing leaks out as a warning
        with pytest.raises(ImageTooLarge):  # over PIL's limit (warning), over ours too
            decode_image(png_header(10_000, 10_000), max_pixels=LIMIT)


def test_an_image_exactly_at_the_limit_is_accepted() -> None:
    assert decode_image(encode(gradient(100, 50), "PNG"), max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageTooLarge):
        decode_image(encode(gradient(100, 50), "PNG"), max_pixels=4999)


def two_tone(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


def with_orientation(image: Image.Image, orientation: int, **params: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95, **params)


@pytest.mark.parametrize(
    ("orientation", "size", "red_at"),
    [
        (1, (40, 20), (5, 10)),  # as stored: red on the left
        (3, (40, 20), (35, 10)),  # rotated 180: red on the right
        (6, (20, 40), (10, 5)),  # rotated 90 clockwise for display: left goes to the top
        (8, (20, 40), (10, 35)),  # rotated 90 counter-clockwise: left goes to the bottom
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], red_at: tuple[int, int]
) -> None:
    decoded = decode_image(with_orientation(two_tone(), orientation), max_pixels=LIMIT)
    assert decoded.size == size
    assert close_to(pixel(decoded, red_at), RED, 40)


def test_draft_decoding_picks_the_smallest_scale_at_least_the_target_in_display_orientation() -> None:
    data = with_orientation(two_tone((3200, 800)), 6)  # displayed as 800 x 3200
    assert decode_image(data, max_pixels=LIMIT).size == (800, 3200)
    # Asking for 100 x 400 as displayed: 1/8 scale fits exactly once the target is turned too.
    drafted = decode_image(data, max_pixels=LIMIT, draft_size=(100, 400))
    assert drafted.size == (100, 400)
    assert close_to(pixel(drafted, (50, 50)), RED, 40)
    # A target the 1/8 scale would undershoot gets the next scale up.
    assert decode_image(data, max_pixels=LIMIT, draft_size=(101, 400)).size == (200, 800)


def test_draft_size_is_ignored_for_formats_without_draft_mode() -> None:
    assert decode_image(encode(gradient(1600, 800), "PNG"), max_pixels=LIMIT, draft_size=(100, 100)).size == (
        1600,
        800,
    )


def test_broken_exif_does_not_break_decoding() -> None:
    data = encode(two_tone(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert decode_image(data, max_pixels=LIMIT).size == (40, 20)


def test_animated_gif_and_webp_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (30, 30), RED), Image.new("RGB", (30, 30), BLUE)]
    for fmt in ("GIF", "WEBP", "PNG", "TIFF"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2, fmt
        assert close_to(pixel(decode_image(data, max_pixels=LIMIT), (15, 15)), RED, 10), fmt


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((255, 0, 0, 128), (0, 0, 10, 20))  # half-transparent red on the left
    decoded = decode_image(encode(rgba, "PNG"), max_pixels=LIMIT)
    assert pixel(decoded, (15, 10)) == WHITE
    assert close_to(pixel(decoded, (5, 10)), (255, 127, 127), 1)


def test_palette_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    palette.paste(1, (0, 0, 10, 20))
    decoded = decode_image(encode(palette, "PNG", transparency=0), max_pixels=LIMIT)
    assert pixel(decoded, (15, 10)) == WHITE  # the transparent index is black in the palette
    assert pixel(decoded, (5, 10)) == RED
    gif = decode_image(encode(palette, "GIF", transparency=0), max_pixels=LIMIT)
    assert pixel(gif, (15, 10)) == WHITE


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_a_transparent_colour_key_is_composited_on_white(mode: str) -> None:
    """PNG's tRNS for a colour or grey image names one value as transparent: those pixels are white,
    as a browser shows them, not the key's colour (black here)."""
    picture = Image.new("RGB", (20, 20), (0, 0, 0))
    picture.paste(RED, (0, 0, 10, 20))
    if mode == "I;16":
        keyed = Image.fromarray(np.asarray(picture.convert("L")).astype(np.uint16) * 257)
    else:
        keyed = picture.convert(mode)
    key = (0, 0, 0) if mode == "RGB" else 0
    data = encode(keyed, "PNG", transparency=key)
    assert Image.open(io.BytesIO(data)).mode == mode and "transparency" in Image.open(io.BytesIO(data)).info
    decoded = decode_image(data, max_pixels=LIMIT)
    assert pixel(decoded, (15, 10)) == WHITE
    assert pixel(decoded, (5, 10)) != WHITE  # the opaque half keeps its colour (or grey level)


def test_cmyk_jpeg_and_tiff_become_rgb() -> None:
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # no cyan and black, full magenta and yellow: red
    for fmt in ("JPEG", "TIFF"):
        data = encode(cmyk, fmt)
        assert Image.open(io.BytesIO(data)).mode == "CMYK"
        assert close_to(pixel(decode_image(data, max_pixels=LIMIT), (10, 10)), RED, 10), fmt


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(fmt: str) -> None:
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(np.repeat(levels, 4, axis=0)), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    decoded = np.asarray(decode_image(data, max_pixels=LIMIT))
    assert decoded[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (decoded[..., 0] == decoded[..., 2]).all()


def _mode_image(mode: str) -> Image.Image:
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    if mode == "1":
        return Image.fromarray(grey).convert("1")
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257, "I")
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0, "F")
    return Image.fromarray(grey).convert(mode)


ModeCheck = Callable[[np.ndarray], bool]


@pytest.mark.parametrize(
    ("mode", "check"),
    [
        ("1", lambda rgb: set(np.unique(rgb)) <= {0, 255}),
        ("L", lambda rgb: rgb[0, :, 0].tolist() == list(range(0, 256, 16))),
        ("LA", lambda rgb: rgb[0, :, 0].tolist() == list(range(0, 256, 16))),
        ("P", lambda rgb: abs(int(rgb[0, 8, 0]) - 128) <= 2),
        ("PA", lambda rgb: abs(int(rgb[0, 8, 0]) - 128) <= 2),
        ("RGBA", lambda rgb: rgb[0, :, 0].tolist() == list(range(0, 256, 16))),
        ("CMYK", lambda rgb: rgb[0, :, 0].tolist() == list(range(0, 256, 16))),
        ("YCbCr", lambda rgb: np.abs(rgb[0, :, 0].astype(int) - np.arange(0, 256, 16)).max() <= 1),
        ("I", lambda rgb: rgb[0, :, 0].tolist() == list(range(0, 256, 16))),
        ("I;16", lambda rgb: rgb[0, :, 0].tolist() == [round(v / 257) for v in range(0, 256, 16)]),
        ("F", lambda rgb: rgb[0, :, 0].tolist() == list(range(0, 256, 16))),
    ],
)
def test_every_mode_converts_to_rgb(mode: str, check: ModeCheck) -> None:
    image = _mode_image(mode)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.size == image.size
    assert check(np.asarray(rgb)), np.asarray(rgb)[0, :, 0]


def test_float_images_beyond_one_are_taken_as_0_to_255_and_clipped() -> None:
    image = Image.fromarray(np.array([[-5.0, 0.0, 100.0, 300.0, float("nan")]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 0, 100, 255, 0]


@pytest.mark.parametrize(
    ("mode", "fmt"), [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "GIF"), ("I", "TIFF"), ("F", "TIFF")]
)
def test_every_mode_decodes_from_bytes(mode: str, fmt: str) -> None:
    data = encode(_mode_image(mode), fmt)
    assert decode_image(data, max_pixels=LIMIT).mode == "RGB"


def test_concurrent_decoding_leaves_the_warning_filters_as_they_were() -> None:
    before = list(warnings.filters)
    payloads = [
        png_header(10_000, 10_000),  # PIL's bomb warning, escalated
        encode(two_tone(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"),  # corrupt EXIF
        with_orientation(two_tone(), 6),
        encode(gradient(), "PNG"),
    ] * 25

    def decode(data: bytes) -> str:
        try:
            return decode_image(data, max_pixels=LIMIT).mode
        except ImageTooLarge:
            return "too large"

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(decode, payloads))
    assert results == ["too large", "RGB", "RGB", "RGB"] * 25
    assert warnings.filters == before


def test_draft_decoding_reduces_no_more_than_asked() -> None:
    data = with_orientation(two_tone((3200, 800)), 6)  # displayed as 800 x 3200
    assert decode_image(data, max_pixels=LIMIT, draft_size=(100, 400), max_draft_reduction=4).size == (
        200,
        800,
    )
    assert decode_image(data, max_pixels=LIMIT, draft_size=(10, 10), max_draft_reduction=2).size == (
        400,
        1600,
    )
    assert decode_image(data, max_pixels=LIMIT, draft_size=(10, 10), max_draft_reduction=1).size == (
        800,
        3200,
    )
