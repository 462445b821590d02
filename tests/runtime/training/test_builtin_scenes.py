"""The builtin:scenes set the quality gate ships (captionfleet/data/scenes) is what the renderer draws."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from captionfleet import evalsets
from captionfleet.runtime.training import builtin_scenes
from captionfleet.runtime.training.scenes import scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED


def test_the_shipped_scenes_are_the_held_out_scenes_as_rendered() -> None:
    shipped = evalsets.builtin_scenes()
    assert [item.key for item in shipped] == [str(i) for i in range(builtin_scenes.BUILTIN_SCENE_COUNT)]
    for index, item in enumerate(shipped):
        assert item.references == (scene_at(HELD_OUT_SEED, index).caption,)
        pixels = np.asarray(Image.open(io.BytesIO(item.image)).convert("RGB"))
        expected = np.asarray(Image.open(io.BytesIO(builtin_scenes.render_png(index))).convert("RGB"))
        assert np.array_equal(pixels, expected), f"scene {index} differs: regenerate (module docstring)"
    assert (builtin_scenes.SHIPPED / evalsets.CAPTIONS_KEY).read_text() == builtin_scenes.captions_json()


def _configmap(captions: object, files: dict[str, bytes]) -> dict[str, object]:
    return {
        "metadata": {"name": "evalset"},
        "data": {evalsets.CAPTIONS_KEY: captions if isinstance(captions, str) else json.dumps(captions)},
        "binaryData": {name: base64.b64encode(body).decode() for name, body in files.items()},
    }


def test_a_configmap_set_reads_images_and_captions() -> None:
    captions = {
        "images": [{"id": 7, "file_name": "a.png"}, {"id": "b", "file_name": "b.png"}],
        "annotations": [
            {"image_id": 7, "caption": "a red circle"},
            {"image_id": 7, "caption": "a circle"},
            {"image_id": "b", "caption": "a blue star"},
        ],
    }
    found = evalsets.configmap_images(_configmap(captions, {"a.png": b"A", "b.png": b"B"}))
    assert found == [
        evalsets.EvalImage("7", b"A", ("a red circle", "a circle")),
        evalsets.EvalImage("b", b"B", ("a blue star",)),
    ]


ONE = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "x y"}]}


@pytest.mark.parametrize(
    ("configmap", "message"),
    [
        ({"metadata": {"name": "evalset"}}, "data has no 'captions.json'"),
        (_configmap("{not json", {"a.png": b"A"}), "is not JSON"),
        (_configmap({"images": []}, {}), "'annotations' list"),
        (_configmap({"images": [], "annotations": []}, {}), "lists 0 images"),
        (_configmap(ONE, {}), "file 'a.png' is not in the set's files"),
        (_configmap({**ONE, "annotations": []}, {"a.png": b"A"}), "image 1 (a.png) has no caption"),
        (
            _configmap({**ONE, "images": ONE["images"] * 2}, {"a.png": b"A"}),
            "image id 1 is listed twice",
        ),
        (
            {**_configmap(ONE, {}), "binaryData": {"a.png": "!!not base64"}},
            "binaryData 'a.png' is not base64",
        ),
    ],
)
def test_a_bad_configmap_set_is_a_clear_error(configmap: dict[str, object], message: str) -> None:
    with pytest.raises(evalsets.DatasetError, match="ConfigMap") as caught:
        evalsets.configmap_images(configmap)
    assert message in str(caught.value)


def test_too_many_images_are_refused() -> None:
    images = [{"id": i, "file_name": "a.png"} for i in range(evalsets.MAX_IMAGES + 1)]
    captions = {"images": images, "annotations": [{"image_id": 0, "caption": "x"}]}
    with pytest.raises(evalsets.DatasetError, match=f"1 to {evalsets.MAX_IMAGES} are allowed"):
        evalsets.configmap_images(_configmap(captions, {"a.png": b"A"}))
