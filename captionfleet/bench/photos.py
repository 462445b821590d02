"""The benchmark's inputs: scikit-image's sample photos, re-encoded as JPEGs of chosen sizes.

Real photos matter: JPEG decoding dominates preprocessing, and its cost depends on the content as
well as the size. The four photos (astronaut, chelsea, coffee, rocket) ship with scikit-image.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Photo:
    name: str
    width: int
    height: int
    jpeg: bytes

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def sample_images() -> list[tuple[str, Image.Image]]:
    """The sample photos as RGB PIL images, at their original sizes (300-640 px)."""
    import skimage.data

    return [(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in PHOTO_NAMES]


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def photos_at(megapixels: float) -> list[Photo]:
    """Each sample photo resized (bicubic, aspect ratio kept) to about ``megapixels`` and JPEG-encoded."""
    photos = []
    for name, image in sample_images():
        scale = math.sqrt(megapixels * 1e6 / (image.width * image.height))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resized = image.resize(size, Image.Resampling.BICUBIC)
        photos.append(Photo(name, size[0], size[1], encode_jpeg(resized)))
    return photos


def request_photos(longer_side: int) -> list[Photo]:
    """Distinct JPEGs for the serving runs: each photo and its mirror image, longer side ``longer_side``."""
    photos = []
    for name, image in sample_images():
        scale = longer_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resized = image.resize(size, Image.Resampling.BICUBIC)
        for variant, picture in (
            (name, resized),
            (f"{name}-mirrored", resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ):
            photos.append(Photo(variant, size[0], size[1], encode_jpeg(picture)))
    return photos
