"""Decoding untrusted image bytes into RGB PIL images, safely and quickly.

- The format is sniffed from the content (PIL's identification, limited to the allowed formats), never
  taken from a filename or a Content-Type header. MPO (multi-picture JPEG from cameras) counts as JPEG.
- Decompression bombs are refused from the header alone: ``Image.open`` is lazy, so width * height is
  checked against ``max_pixels`` before any pixel data is decoded.
- Truncated or corrupt data raises :class:`InvalidImage`; PIL's global ``LOAD_TRUNCATED_IMAGES`` is
  never touched.
- JPEGs can be decoded in draft mode (DCT scaling by 1/2, 1/4 or 1/8) straight to the smallest scale
  that is still at least the size the model needs: a 12 MP photo then decodes about 8x faster.
- Every PIL mode becomes RGB: transparency is composited on white, 16-bit and 32-bit integer data are
  scaled to 8 bits (not clipped), float data is taken as 0..1 when it fits, else 0..255.
- EXIF orientation is applied; animations give their first frame.

What is decided here, so callers can rely on it:
- Empty bytes -> :class:`InvalidImage`.
- Bytes that start like an allowed format (by magic number) but do not decode -> :class:`InvalidImage`.
- Anything else PIL cannot identify as an allowed format (text, HTML, PDF, SVG, ICO, HEIC, ...) ->
  :class:`UnsupportedImageFormat`: the request was "not an image we take", not a broken image.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Collection, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from captionfleet.runtime.engine.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat

ALLOWED_FORMATS: frozenset[str] = frozenset(
    {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"} | ({"AVIF"} if features.check("avif") else set())
)
"""Formats accepted by default, as PIL names them. AVIF (what recent phones and browsers send) when
this Pillow build decodes it (the wheels of Pillow 13 do); HEIC needs a plugin we do not ship."""

DEFAULT_MAX_PIXELS = 40_000_000
"""A sensible width * height limit (40 MP) for callers without their own setting."""

# PIL format names that are accepted as another one: MPO is a JPEG with extra pictures appended.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# Leading bytes of the allowed formats: bytes that start like one of these but fail to decode are a
# broken image (InvalidImage), not a different kind of content (UnsupportedImageFormat).
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}

# EXIF orientations that swap width and height (transpose, 90, transverse, 270).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112

# Modes with an alpha channel that are composited on white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes whose ``transparency`` info (a palette entry, a colour or a grey level) PIL turns into alpha.
_KEYED_MODES = frozenset({"P", "RGB", "L", "1"})
WHITE = (255, 255, 255)


def sniff_format(data: bytes) -> str | None:
    """The allowed format whose magic number ``data`` starts with, if any (WEBP: RIFF....WEBP)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypavis"):  # an ISO media file whose major brand is AVIF
        return "AVIF"
    for name, magics in _MAGIC.items():
        if any(data.startswith(magic) for magic in magics):
            return name
    return None


def _pil_formats(allowed: Collection[str]) -> list[str]:
    # MPO has no opener of its own: PIL's JPEG opener returns an MPO image when it finds one.
    return sorted({name.upper() for name in allowed} - _FORMAT_ALIASES.keys())


def open_image(
    data: bytes, *, max_pixels: int, allowed_formats: Collection[str] = ALLOWED_FORMATS
) -> Image.Image:
    """Identify ``data`` and check its size without decoding pixels (``Image.open`` is lazy).

    Returns the lazily opened image positioned on its first frame; raises the engine's image errors.
    """
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    allowed = {name.upper() for name in allowed_formats}
    try:
        with _pil_warnings(max_pixels):
            image = Image.open(io.BytesIO(data), formats=_pil_formats(allowed))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has too many pixels (limit {max_pixels}): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data, allowed) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on junk
        raise InvalidImage(f"the image could not be read: {exc}") from exc

    kind = _FORMAT_ALIASES.get(image.format or "", image.format or "")
    if kind not in allowed:
        image.close()
        raise UnsupportedImageFormat(
            f"{kind or 'unknown'} images are not accepted; allowed: {_names(allowed)}"
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    return image


# warnings.catch_warnings swaps a process-global filter list and restores it on exit: two threads
# nesting it out of order would leave one's filters installed for good. Decoding runs in a thread
# pool, so the (cheap, header-only) steps that need the filters take turns; load() runs outside.
_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_warnings(max_pixels: int) -> Iterator[None]:
    """PIL's warnings about untrusted data: bombs become errors, the rest is silenced.

    PIL warns about decompression bombs inside ``Image.open`` (and raises at twice its limit). The
    warning becomes an error (then ImageTooLarge) only when our limit is not more generous than PIL's;
    our explicit check is authoritative either way. Other PIL warnings (corrupt EXIF, odd chunks) are
    about the client's file, not our code, and would flood the logs.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    escalate = pil_limit is None or max_pixels <= pil_limit
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("error" if escalate else "ignore", Image.DecompressionBombWarning)
        yield


def _unidentified(data: bytes, allowed: set[str]) -> Exception:
    sniffed = sniff_format(data)
    if sniffed is not None and sniffed in allowed:
        return InvalidImage(f"the data starts like a {sniffed} image but cannot be decoded")
    return UnsupportedImageFormat(f"the data is not an image in an accepted format ({_names(allowed)})")


def _names(formats: Collection[str]) -> str:
    return ", ".join(sorted(formats))


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF blocks are common in the wild; they only lose the rotation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: Collection[str] = ALLOWED_FORMATS,
    draft_size: tuple[int, int] | None = None,
    max_draft_reduction: int = 8,
) -> Image.Image:
    """Decode ``data`` into an RGB image: first frame, EXIF orientation applied.

    ``draft_size`` (width, height), when given, lets JPEGs decode at the smallest DCT scale whose
    *displayed* size (after EXIF rotation) is still at least that size in both dimensions, reducing
    by at most ``max_draft_reduction`` (1, 2, 4 or 8); other formats decode fully. Leave it ``None``
    for the full-resolution image.
    """
    image = open_image(data, max_pixels=max_pixels, allowed_formats=allowed_formats)
    try:
        with _pil_warnings(max_pixels):
            orientation = exif_orientation(image)
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            width, height = draft_size
            if orientation in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            # draft() picks the largest reduction (8, 4, 2, 1) that keeps both sides >= the requested
            # size; asking for at least 1/max of each side keeps it from reducing further than that.
            width = max(width, image.width // max_draft_reduction, 1)
            height = max(height, image.height // max_draft_reduction, 1)
            image.draft("RGB", (width, height))
        image.load()
    except Exception as exc:  # truncated data surfaces here as OSError("image file is truncated ...")
        image.close()
        raise InvalidImage(f"the image could not be decoded: {exc}") from exc

    if orientation != 1:
        try:
            with _pil_warnings(max_pixels):
                image = ImageOps.exif_transpose(image)
        except Exception as exc:
            raise InvalidImage(f"the image's EXIF orientation could not be applied: {exc}") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency on white.

    Transparency is an alpha channel, a palette's transparent entries, or (PNG's tRNS, GIF's) one
    colour or grey level of an RGB, L, 1 or 16-bit image that stands for "transparent": such pixels
    are white too, as a browser on a white page shows them, not the key colour (often black)."""
    mode = image.mode
    keyed = image.info.get("transparency")
    if keyed is not None and mode in _KEYED_MODES:
        return _composite_on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES:
        return _composite_on_white(image.convert("RGBA"))
    if mode.startswith("I;16") or mode == "I":
        rgb = _wide_integers_to_rgb(image)
        if isinstance(keyed, int):
            rgb.paste(WHITE, mask=Image.fromarray(np.asarray(image) == keyed))
        return rgb
    if mode == "F":
        return _floats_to_rgb(image)
    try:
        return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, ...
    except Exception as exc:
        raise InvalidImage(f"images in PIL mode {mode} cannot be converted to RGB: {exc}") from exc


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    if rgba.mode != "RGBA":
        rgba = rgba.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").convert("RGB")


def _wide_integers_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (I;16*) and 32-bit (I) grey levels to 8 bits by scaling the full 16-bit range.

    PIL's own ``convert('L')`` clips these at 255, which turns most 16-bit photos white. Mode I data
    beyond 16 bits (rare 32-bit TIFFs) is scaled by its own maximum instead.
    """
    values = np.asarray(image).astype(np.float64)
    values = np.clip(values, 0, None)
    top = float(values.max(initial=0.0))
    scale = 65535.0 if top <= 65535.0 else top
    return _gray_to_rgb(np.rint(values * (255.0 / scale)))


def _floats_to_rgb(image: Image.Image) -> Image.Image:
    """Float grey levels: 0..1 data (the usual float convention) is stretched, else clipped to 0..255."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    top = float(values.max(initial=0.0))
    if top <= 1.0:
        values = values * 255.0
    return _gray_to_rgb(np.rint(np.clip(values, 0.0, 255.0)))
