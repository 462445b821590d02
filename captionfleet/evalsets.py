"""Evaluation sets as encoded images and reference captions, with no image library (the operator's).

Two sources, both COCO-style (``images[{id, file_name}]``, ``annotations[{image_id, caption}]``):

- ``builtin:scenes``: held-out synthetic scenes shipped as package data (``captionfleet/data/scenes``:
  PNG files and ``captions.json``), so the operator image holds them without the renderer.
  ``captionfleet.runtime.training.builtin_scenes`` writes them from ``scene_at`` (and a test checks
  that they still equal what it renders).
- a ConfigMap: its ``binaryData`` holds the images by file name, its ``data`` the captions JSON under
  ``CAPTIONS_KEY``. The API server caps a ConfigMap at 1 MiB in all, so a set is at most that big;
  ``MAX_IMAGES`` bounds the count.

Images are passed on as bytes, never decoded here: the runtime that captions them decodes them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionfleet.scoring import normalise_text

BUILTIN_SCENES = "builtin:scenes"
CONFIGMAP_PREFIX = "configMap:"
CAPTIONS_KEY = "captions.json"
MAX_IMAGES = 500
SCENES_FOLDER = Path(__file__).resolve().parent / "data" / "scenes"  # package data of both distributions


class DatasetError(ValueError):
    """The evaluation set (images or captions) cannot be used; the message says why and where."""


@dataclass(frozen=True)
class EvalImage:
    key: str
    image: bytes
    references: tuple[str, ...]


def coco_captions(data: Any, source: str) -> dict[str, list[str]]:
    """The non-empty reference captions of a COCO captions document, by image id (as a string)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{source}: expected a JSON object with an 'images' list")
    if not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{source}: expected a JSON object with an 'annotations' list")
    captions: dict[str, list[str]] = {}
    for position, annotation in enumerate(data["annotations"]):
        if (
            not isinstance(annotation, dict)
            or not isinstance(annotation.get("image_id"), (int, str))
            or not isinstance(annotation.get("caption"), str)
        ):
            raise DatasetError(
                f"{source}: annotations[{position}] needs an 'image_id' (int or string) "
                "and a 'caption' (string)"
            )
        if normalise_text(annotation["caption"]):
            captions.setdefault(str(annotation["image_id"]), []).append(annotation["caption"])
    return captions


def coco_images(captions_json: str, files: Mapping[str, bytes], source: str) -> list[EvalImage]:
    """The listed images, in the captions file's order; every listed image must be in ``files`` and
    captioned (a gate scores exactly the set it was given, nothing silently left out)."""
    try:
        data = json.loads(captions_json)
    except ValueError as exc:
        raise DatasetError(f"{source}: {CAPTIONS_KEY} is not JSON: {exc}") from exc
    captions = coco_captions(data, source)
    if not 0 < len(data["images"]) <= MAX_IMAGES:
        raise DatasetError(f"{source}: lists {len(data['images'])} images; 1 to {MAX_IMAGES} are allowed")
    found: dict[str, EvalImage] = {}
    for position, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)):
            raise DatasetError(f"{source}: images[{position}] needs an 'id' and a 'file_name'")
        key, name = str(image["id"]), image.get("file_name")
        if key in found:
            raise DatasetError(f"{source}: image id {key} is listed twice")
        if not isinstance(name, str) or name not in files:
            raise DatasetError(f"{source}: images[{position}] file {name!r} is not in the set's files")
        if key not in captions:
            raise DatasetError(f"{source}: image {key} ({name}) has no caption")
        found[key] = EvalImage(key, files[name], tuple(captions[key]))
    return list(found.values())


def builtin_scenes() -> list[EvalImage]:
    """The held-out synthetic scenes shipped with the package."""
    captions = (SCENES_FOLDER / CAPTIONS_KEY).read_text(encoding="utf-8")
    files = {path.name: path.read_bytes() for path in SCENES_FOLDER.glob("*.png")}
    return coco_images(captions, files, BUILTIN_SCENES)


def configmap_images(configmap: Mapping[str, Any]) -> list[EvalImage]:
    """The set a ConfigMap holds: images in ``binaryData`` (base64, as the API returns them), the
    captions JSON in ``data[CAPTIONS_KEY]``."""
    name = (configmap.get("metadata") or {}).get("name", "")
    source = f"ConfigMap {name}"
    captions = (configmap.get("data") or {}).get(CAPTIONS_KEY)
    if not isinstance(captions, str):
        raise DatasetError(f"{source}: data has no {CAPTIONS_KEY!r} (a COCO-style captions file)")
    files: dict[str, bytes] = {}
    for file_name, encoded in (configmap.get("binaryData") or {}).items():
        try:
            files[file_name] = base64.b64decode(str(encoded), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DatasetError(f"{source}: binaryData {file_name!r} is not base64: {exc}") from exc
    return coco_images(captions, files, source)
