"""The ``builtin:scenes`` evaluation set: held-out synthetic scenes written as PNG files plus a COCO-style
``captions.json`` into ``captionfleet/data/scenes`` (package data of the core, so the operator image
ships them; ``captionfleet/evalsets.py`` reads them without an image library).

Regenerate with ``python -m captionfleet.runtime.training.builtin_scenes [FOLDER]``;
``tests/runtime/training/test_builtin_scenes.py`` checks that the shipped files are what this renders.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from captionfleet.evalsets import CAPTIONS_KEY, SCENES_FOLDER
from captionfleet.runtime.training.scenes import SCENE_SIZE, scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED

BUILTIN_SCENE_COUNT = 40
"""Scenes 0-39 of the held-out seed: enough to tell a working model (exact match about 0.98) from a
broken one, few enough that a gate captions them in seconds."""
SHIPPED = SCENES_FOLDER


def scene_file(index: int) -> str:
    return f"scene-{index:03d}.png"


def render_png(index: int) -> bytes:
    buffer = io.BytesIO()
    scene_at(HELD_OUT_SEED, index).render(SCENE_SIZE).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def captions_json(count: int = BUILTIN_SCENE_COUNT) -> str:
    images = [{"id": index, "file_name": scene_file(index)} for index in range(count)]
    annotations = [
        {"id": index, "image_id": index, "caption": scene_at(HELD_OUT_SEED, index).caption}
        for index in range(count)
    ]
    info = {"description": f"synthetic scenes, seed {HELD_OUT_SEED}, scenes 0-{count - 1}"}
    return json.dumps({"info": info, "images": images, "annotations": annotations}, indent=1) + "\n"


def write(folder: Path, count: int = BUILTIN_SCENE_COUNT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / scene_file(index)).write_bytes(render_png(index))
    (folder / CAPTIONS_KEY).write_text(captions_json(count), encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED)
