"""The result cache's image key: a perceptual block-mean signature with colour, found by bucket probing.

What counts as "the same image": every cell of a 16x16 grid of mean RGB colours (area averages of
the whole picture, so independent of its size) within :data:`TOLERANCE` levels of the other's. Area
means survive re-encoding (PNG <-> JPEG q85) and resizing; being colour, they tell a red circle from a
green one of the same brightness, which a luminance hash (pHash, aHash) cannot.

Why 16 cells a side: the cache must hit for the copies users make of one picture (issue 2: PNG <->
JPEG q85, 50 %), and for the encoders' defaults (JPEG q75, WebP q80, a half-size JPEG). At 16x16
those are within 27 levels of the original on 128 px scenes; at 32x32 a half-size JPEG q85 is 68
apart and a JPEG q70 39, further than two scenes that differ only in one small shape (a circle where
the other has a square, same colour and place: 35 or more at 32x32). The known limit of 16x16: such a
one-shape swap, rare between real pictures, matched in 4 % of constructed pairs (537 swaps of 100
scenes, seed 5000011); distinct scenes drawn at random never matched (800 scenes each of seeds 1 and
777, every pair).

Why not pHash's exact bits as the key: on flat synthetic scenes many of its DCT coefficients sit at
the median and flip under JPEG + 50 % resizing (measured: a dozen bits for some scenes), so a
re-encoded scene would miss. Instead, lookups go through *buckets* that tolerate noise by design:

- the bucket is 6 coarse features quantised: the mean luminance of the 4 quadrants (step 32) and the
  mean chroma Cb, Cr (step 16);
- an entry is written to its own bucket only; a lookup also probes, per feature, the neighbouring
  step when its value lies within :data:`PROBE_MARGINS` of a step boundary. So an image whose features
  moved by less than the margins (re-encoding moves them by about 1 level) always finds the bucket;
  usually 1-8 probes, at most 64;
- within the probed buckets the 16x16 colour grids decide.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from captionfleet.runtime.serving.repeats import body_digest

GRID = 16
TOLERANCE = 40
"""Largest per-cell, per-channel difference (of 255) between two images that count as the same.
Measured on synthetic scenes: re-encodings differ by at most ~31 (at sharp edges), distinct scenes
by 50 or more."""
STEPS = (32.0, 32.0, 32.0, 32.0, 16.0, 16.0)
"""Quantisation steps of the bucket features: 4 quadrant luminances, then Cb and Cr."""
PROBE_MARGINS = (4.0, 4.0, 4.0, 4.0, 3.0, 3.0)
"""How close to a step boundary a feature must be for lookups to probe the neighbouring step too."""

_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class ImageKey:
    features: tuple[float, ...]
    """The coarse bucket features (quadrant luminances, Cb, Cr), 0..255."""
    signature: bytes
    """GRID x GRID x RGB cell means, row-major, one byte each."""

    @property
    def bucket(self) -> str:
        """The bucket this image is stored in."""
        return _bucket_name(int(value // step) for value, step in zip(self.features, STEPS, strict=True))

    def probes(self) -> list[str]:
        """Every bucket a near-identical image may have been stored in, this one's first."""
        options: list[list[int]] = []
        for value, step, margin in zip(self.features, STEPS, PROBE_MARGINS, strict=True):
            own = int(value // step)
            choices = [own]
            offset = value - own * step
            if offset < margin:
                choices.append(own - 1)
            elif offset > step - margin:
                choices.append(own + 1)
            options.append(choices)
        return [_bucket_name(combination) for combination in itertools.product(*options)]


def _bucket_name(indexes: Iterable[int]) -> str:
    return ".".join(str(index) for index in indexes)


def image_key(image: Image.Image) -> ImageKey:
    """The cache key of a decoded image (any mode; well under a millisecond for a 384 px image)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    cells = np.asarray(rgb.resize((GRID, GRID), Image.Resampling.BOX), dtype=np.float64)
    luma = cells @ _LUMA
    half = GRID // 2
    quadrants = luma.reshape(2, half, 2, half).mean(axis=(1, 3)).ravel()
    cb = float(((cells[..., 2] - luma) * 0.564).mean()) + 128.0
    cr = float(((cells[..., 0] - luma) * 0.713).mean()) + 128.0
    features = (*(float(q) for q in quadrants), cb, cr)
    signature = np.clip(np.rint(cells), 0, 255).astype(np.uint8).tobytes()
    return ImageKey(features=features, signature=signature)


def signature_distance(first: bytes, second: bytes) -> int:
    """The largest per-cell, per-channel difference between two signatures (255: unrelated)."""
    if len(first) != len(second):
        return 255
    a = np.frombuffer(first, dtype=np.uint8).astype(np.int16)
    b = np.frombuffer(second, dtype=np.uint8).astype(np.int16)
    return int(np.abs(a - b).max(initial=0))


def same_image(first: bytes, second: bytes) -> bool:
    return signature_distance(first, second) <= TOLERANCE


class KeyMemo:
    """The image keys of recently seen request bodies, by a digest of their bytes.

    A body seen before gets its key without being decoded again: decoding (to compute the perceptual
    key) is most of the cost of a cache hit. The key is a pure function of the bytes, so this changes no
    answer, only skips work. Thread-safe: the preprocessing pool's threads share it.
    """

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._keys: OrderedDict[bytes, ImageKey] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(data: bytes) -> bytes:
        return body_digest(data)  # the one digest rule: Redis's exact repeats use it too (repeats.py)

    def get(self, digest: bytes) -> ImageKey | None:
        with self._lock:
            key = self._keys.get(digest)
            if key is not None:
                self._keys.move_to_end(digest)
            return key

    def put(self, digest: bytes, key: ImageKey) -> None:
        with self._lock:
            self._keys[digest] = key
            self._keys.move_to_end(digest)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)
