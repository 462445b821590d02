"""Images unlike the synthetic scenes, by family, for measuring out-of-distribution detection.

Every family is drawn from a seed, so the same call gives the same images:

- ``photographs``: scikit-image's sample photographs (shipped with it, no download), whole and as
  random square crops, some mirrored;
- ``noise``: uniform RGB noise; ``gradients``: two-axis colour ramps;
- ``rendered_text``: words drawn with PIL's default font on a plain background;
- ``unseen_shapes``: scenes' backgrounds and colours with shapes the model never saw (hexagons,
  bars, lines, half discs, rings).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image, ImageDraw

from captionfleet.runtime.training.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, SCENE_SIZE

PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry",
    "hubble_deep_field", "retina", "page", "text", "moon", "horse", "clock", "coins", "brick",
    "grass", "gravel", "colorwheel", "logo",
)  # fmt: skip
"""The scikit-image samples used, colour and grey alike."""
_WORDS = ("hello", "captionfleet", "drift", "the quick brown fox", "12345", "lorem ipsum", "OOD")


def _rgb(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def photographs(count: int, seed: int = 0) -> list[Image.Image]:
    """The sample photographs first, then random crops (40-90 % of the shorter side), half mirrored."""
    import numpy as np
    import skimage.data

    rng = random.Random(f"ood-photographs:{seed}")
    originals = []
    for name in PHOTO_NAMES:
        array = np.asarray(getattr(skimage.data, name)())
        if array.dtype != np.uint8:  # a few samples are booleans or floats in [0, 1]
            array = (array.astype(np.float64) * 255).clip(0, 255).astype(np.uint8)
        originals.append(Image.fromarray(array).convert("RGB"))
    images = originals[:count]
    while len(images) < count:
        photo = rng.choice(originals)
        side = int(min(photo.size) * rng.uniform(0.4, 0.9))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side))
        images.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return images


def noise(count: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(f"ood-noise:{seed}")
    size = (SCENE_SIZE, SCENE_SIZE)
    return [Image.frombytes("RGB", size, rng.randbytes(3 * SCENE_SIZE**2)) for _ in range(count)]


def gradients(count: int, seed: int = 0) -> list[Image.Image]:
    import numpy as np

    rng = random.Random(f"ood-gradients:{seed}")
    ramp = np.linspace(0.0, 1.0, SCENE_SIZE)
    images = []
    for _ in range(count):
        across, down = np.array(_rgb(rng), float), np.array(_rgb(rng), float)
        array = ramp[None, :, None] * across + ramp[:, None, None] * down
        images.append(Image.fromarray(array.clip(0, 255).astype(np.uint8)))
    return images


def rendered_text(count: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(f"ood-text:{seed}")
    images = []
    for index in range(count):
        image = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), _rgb(rng))
        draw = ImageDraw.Draw(image)
        for line in range(3):
            position = (rng.randrange(60), rng.randrange(110))
            word = _WORDS[(index + line) % len(_WORDS)]
            draw.text(position, word, fill=_rgb(rng), font_size=rng.randrange(12, 30))
        images.append(image)
    return images


def unseen_shapes(count: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(f"ood-shapes:{seed}")
    drawings: list[Callable[[ImageDraw.ImageDraw, tuple[int, int, int]], None]] = [
        lambda draw, colour: draw.regular_polygon((64, 64, 35), 6, fill=colour),
        lambda draw, colour: draw.rectangle((20, 50, 108, 78), fill=colour),
        lambda draw, colour: draw.line((10, 10, 118, 118), fill=colour, width=8),
        lambda draw, colour: draw.chord((20, 20, 108, 108), 0, 180, fill=colour),
        lambda draw, colour: draw.ellipse((24, 24, 104, 104), outline=colour, width=10),
    ]
    images = []
    for index in range(count):
        image = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), rng.choice(list(BACKGROUND_COLOURS.values())))
        drawings[index % len(drawings)](ImageDraw.Draw(image), rng.choice(list(OBJECT_COLOURS.values())))
        images.append(image)
    return images


FAMILIES: dict[str, Callable[[int, int], list[Image.Image]]] = {
    "photographs": photographs,
    "noise": noise,
    "gradients": gradients,
    "rendered_text": rendered_text,
    "unseen_shapes": unseen_shapes,
}
