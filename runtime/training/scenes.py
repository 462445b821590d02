"""Synthetic scenes: one or two coloured shapes on a plain background, each with its one true caption.

A scene is drawn from a seed and an index alone (``scene_at(seed, index)``), so scene 7 of seed 0 is the
same picture in every run, on every machine, whatever the number of scenes asked for: the held-out set
is a fixed list, and its first 100 scenes are a subset of its first 500.

Captions must follow from the picture, with no second reading. That is why:

- colours are far apart in hue or lightness, and the background colours are never object colours;
- the two sizes differ by about 1.6x in radius (small 0.11-0.125, large 0.18-0.20 of the side), and even
  a small shape spans about two patches of the model, so its outline is visible;
- shapes tilt at most 12 degrees, so a square never turns into a diamond;
- two shapes are either stacked (their centres 0.46+ apart vertically, at most 0.14 horizontally) or side
  by side (the same, transposed), and the caption names the upper or the left one first: "above" and
  "to the left of" are the only relations, so "X above Y" is never also "Y below X".

Caption grammar::

    a <size> <colour> <shape> [above | to the left of] a <size> <colour> <shape> on a <bg> background
    a <size> <colour> <shape> on a <bg> background
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

SCENE_SIZE = 128
"""Side of a rendered scene in pixels (models resize it to their own input size, like any image)."""

SUPERSAMPLE = 3
"""Shapes are drawn this many times larger and reduced, for anti-aliased edges."""

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 160, 60),
    "blue": (35, 80, 220),
    "purple": (135, 45, 175),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.125), "large": (0.18, 0.20)}
"""Radius (centre to corner) as a fraction of the side, per size word."""
RELATIONS: dict[str, str] = {"above": "above", "left": "to the left of"}
"""Relation -> its words in the caption; the first shape named is the upper or the left one."""

COLOUR_JITTER = 12
"""Largest per-channel change of a colour, so colours vary but never reach a neighbour's."""
MAX_TILT = 12.0
"""Largest rotation of squares, triangles and stars, in degrees."""
PAIR_FRACTION = 0.8
"""Share of scenes with two shapes; the rest have one."""

PROMPTS: tuple[str, ...] = ("a picture of", "a photography of", "a photo of", "an image of")
"""Caption prefixes the model learns to continue (the server's style presets use the first two)."""


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float
    """Centre, as a fraction of the width (0 = left edge)."""
    y: float
    """Centre, as a fraction of the height (0 = top edge)."""
    radius: float
    """Centre-to-corner distance, as a fraction of the side."""
    tilt: float
    """Rotation in degrees (0 for circles)."""
    rgb: tuple[int, int, int]
    """The colour as drawn: ``OBJECT_COLOURS[colour]`` with a little jitter."""

    @property
    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    """One or two shapes; with two, the first is the upper (``above``) or the left one (``left``)."""
    relation: str | None
    """``above``, ``left``, or ``None`` for one shape."""

    @property
    def caption(self) -> str:
        first = self.objects[0].words
        if self.relation is not None:
            first = f"{first} {RELATIONS[self.relation]} {self.objects[1].words}"
        return f"{first} on a {self.background} background"

    def render(self, size: int = SCENE_SIZE) -> Image.Image:
        """The scene as an RGB image ``size`` pixels square."""
        big = size * SUPERSAMPLE
        image = Image.new("RGB", (big, big), self.background_rgb)
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw(draw, obj, big)
        return image.resize((size, size), Image.Resampling.BOX)

    def mask(self, size: int) -> Image.Image:
        """Which shape covers each pixel: an ``L`` image, 0 for background and ``i + 1`` for shape ``i``."""
        image = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(image)
        for index, obj in enumerate(self.objects):
            _draw(draw, obj, size, fill=index + 1)
        return image


def caption_vocabulary() -> list[str]:
    """Every word a caption or a training prompt can hold, in a fixed order."""
    words = ["a", "an", "on", "background", "above", "to", "the", "left", "of"]
    words += list(SIZES) + list(OBJECT_COLOURS) + list(SHAPES) + list(BACKGROUND_COLOURS)
    for prompt in PROMPTS:
        words += prompt.split()
    return list(dict.fromkeys(words))


def caption_phrases() -> list[str]:
    """Every multi-word piece a caption is built of: each shape's words (``a large red circle``), each
    background's (``on a white background``) and the relations of more than one word."""
    objects = [
        f"a {size} {colour} {shape}" for size in SIZES for colour in OBJECT_COLOURS for shape in SHAPES
    ]
    backgrounds = [f"on a {background} background" for background in BACKGROUND_COLOURS]
    return objects + backgrounds + [words for words in RELATIONS.values() if " " in words]


def scene_at(seed: int, index: int) -> Scene:
    """Scene number ``index`` of the set drawn from ``seed`` (independent of every other scene)."""
    rng = random.Random(f"captionfleet-scenes:{seed}:{index}")
    background = rng.choice(list(BACKGROUND_COLOURS))
    count = 2 if rng.random() < PAIR_FRACTION else 1
    specs = [
        (rng.choice(SHAPES), rng.choice(list(OBJECT_COLOURS)), rng.choice(list(SIZES))) for _ in range(count)
    ]
    if count == 1:
        shape, colour, size = specs[0]
        radius = rng.uniform(*SIZES[size])
        low, high = radius * 1.2 + 0.03, 1 - radius * 1.2 - 0.03
        single = _object(rng, shape, colour, size, rng.uniform(low, high), rng.uniform(low, high), radius)
        return Scene(background, _jitter(rng, BACKGROUND_COLOURS[background], 6), (single,), None)
    relation = rng.choice(list(RELATIONS))
    # Along the relation's axis the first centre sits in 0.24-0.27 and the second in 0.73-0.76;
    # across it both sit in 0.3-0.7 and at most 0.14 apart. Large shapes (reaching about 0.2 along
    # an axis, 1.2 * 0.2 at a star's tip) stay inside and apart.
    along = (rng.uniform(0.24, 0.27), rng.uniform(0.73, 0.76))
    across_first = rng.uniform(0.3, 0.7)
    across_second = min(0.7, max(0.3, across_first + rng.uniform(-0.14, 0.14)))
    objects = tuple(
        _object(
            rng,
            shape,
            colour,
            size,
            *((across, position) if relation == "above" else (position, across)),
            rng.uniform(*SIZES[size]),
        )
        for (shape, colour, size), position, across in zip(
            specs, along, (across_first, across_second), strict=True
        )
    )
    return Scene(background, _jitter(rng, BACKGROUND_COLOURS[background], 6), objects, relation)


def scenes(seed: int, count: int, start: int = 0) -> Iterator[Scene]:
    """Scenes ``start`` .. ``start + count - 1`` of ``seed``."""
    for index in range(start, start + count):
        yield scene_at(seed, index)


def _object(
    rng: random.Random, shape: str, colour: str, size: str, x: float, y: float, radius: float
) -> SceneObject:
    tilt = 0.0 if shape == "circle" else rng.uniform(-MAX_TILT, MAX_TILT)
    rgb = _jitter(rng, OBJECT_COLOURS[colour], COLOUR_JITTER)
    return SceneObject(shape, colour, size, x, y, radius, tilt, rgb)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, channel + rng.randint(-amount, amount))) for channel in rgb)
    return (r, g, b)


def _draw(
    draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, fill: int | tuple[int, int, int] | None = None
) -> None:
    """Draw one shape; every shape reaches about ``radius`` from the centre, so sizes look alike."""
    fill = obj.rgb if fill is None else fill
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if obj.shape == "square":  # corners at 45 degrees: upright; half-side 0.85 r
        points = _polygon(cx, cy, [r * 1.2] * 4, 45.0 + obj.tilt)
    elif obj.shape == "triangle":  # pointing up, centred on its bounding box rather than its centroid
        points = _polygon(cx, cy + r * 0.31, [r * 1.25] * 3, -90.0 + obj.tilt)
    elif obj.shape == "star":
        points = _polygon(cx, cy + r * 0.11, [r * 1.2, r * 0.5] * 5, -90.0 + obj.tilt)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    draw.polygon(points, fill=fill)


def _polygon(cx: float, cy: float, radii: list[float], start_degrees: float) -> list[tuple[float, float]]:
    """Vertices at equal angles from ``start_degrees`` (0 = right, -90 = up), one per radius."""
    step = 2 * math.pi / len(radii)
    start = math.radians(start_degrees)
    return [
        (cx + radius * math.cos(start + i * step), cy + radius * math.sin(start + i * step))
        for i, radius in enumerate(radii)
    ]
