"""Out-of-distribution fields, drift and its metrics through a real server with the bundled model.

200 held-out scenes leave the drift below the alert threshold; 200 photographs (scikit-image's,
whole and cropped) push it above. A model directory without a reference builds one from its first
requests and says so in ``GET /v1/models``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import aiohttp
import pytest
import torch
from PIL import Image

from captionfleet.runtime.engine.captioner import Captioner, bundled_model_dir, load_captioner
from captionfleet.runtime.engine.ood import REFERENCE_FILE
from captionfleet.runtime.server.testing import encode
from captionfleet.runtime.serving.drift import DRIFT_ALERT_THRESHOLD
from captionfleet.runtime.training.ood_images import photographs
from captionfleet.runtime.training.reference import scene_images
from captionfleet.runtime.training.settings import HELD_OUT_SEED

REQUESTS = 200


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_captioner(str(bundled_model_dir()))


async def _caption_all(http: aiohttp.ClientSession, base: str, images: list[Image.Image]) -> list[dict]:
    results: list[dict] = []
    for start in range(0, len(images), 32):
        form = aiohttp.FormData()
        for index, image in enumerate(images[start : start + 32]):
            form.add_field("images", encode(image, "JPEG", quality=95), filename=f"{index}.jpg")
        async with http.post(base + "/v1/caption/batch", data=form) as response:
            assert response.status == 200, await response.text()
            results += (await response.json())["results"]
    return results


async def _state(http: aiohttp.ClientSession, base: str) -> tuple[dict, dict[str, float]]:
    async with http.get(base + "/v1/models") as response:
        (model,) = (await response.json())["models"]
    async with http.get(base + "/metrics") as response:
        text = await response.text()
    figures = {
        name: float(value)
        for name, value in re.findall(
            r"^(captionfleet_(?:feature_drift|ood_requests_total|confidence_window_mean))\{[^}]*\} (\S+)$",
            text,
            re.M,
        )
    }
    return model, figures


@pytest.mark.parametrize("feed", ["held_out_scenes", "photographs"])
async def test_drift_stays_low_for_scenes_and_rises_for_photos(start_server, http, bundled, feed) -> None:
    server = await start_server(captioner=bundled, model=str(bundled_model_dir()), drift_window=REQUESTS)
    if feed == "held_out_scenes":
        images = list(scene_images(HELD_OUT_SEED, REQUESTS))
    else:
        images = photographs(REQUESTS, seed=0)
    results = await _caption_all(http, server.url, images)
    assert all(isinstance(result["ood_score"], float) for result in results)
    outside = sum(not result["in_distribution"] for result in results)
    model, figures = await _state(http, server.url)
    drift = model["drift"]
    assert drift["window"] == REQUESTS and drift["out_of_distribution"] == outside
    assert drift["alert_threshold"] == DRIFT_ALERT_THRESHOLD
    assert figures["captionfleet_feature_drift"] == pytest.approx(drift["drift"])
    assert figures["captionfleet_ood_requests_total"] == outside
    mean = sum(result["confidence"] for result in results) / len(results)
    assert figures["captionfleet_confidence_window_mean"] == pytest.approx(mean)
    assert drift["confidence_mean"] == pytest.approx(mean)
    if feed == "held_out_scenes":
        assert drift["drift"] < DRIFT_ALERT_THRESHOLD and outside <= 0.05 * REQUESTS
    else:
        assert drift["drift"] > DRIFT_ALERT_THRESHOLD and drift["p_value"] < 0.01


async def test_a_model_without_reference_builds_it_from_its_first_requests(
    start_server, http, tmp_path: Path
) -> None:
    model_dir = tmp_path / "no-reference"
    shutil.copytree(bundled_model_dir(), model_dir)
    (model_dir / REFERENCE_FILE).unlink()
    server = await start_server(captioner=load_captioner(str(model_dir)), ood_reference_requests=30)
    scenes = list(scene_images(HELD_OUT_SEED, 40))
    first = await _caption_all(http, server.url, scenes[:20])
    assert all("ood_score" not in result and "in_distribution" not in result for result in first)
    model, _ = await _state(http, server.url)
    assert model["ood"]["reference"] == "building" and model["ood"]["collected"] == 20
    assert model["ood"]["needed"] == 30
    await _caption_all(http, server.url, scenes[20:30])
    later = await _caption_all(http, server.url, scenes[30:])
    assert all(0.0 <= result["ood_score"] <= 1.0 for result in later)
    model, _ = await _state(http, server.url)
    assert model["ood"]["reference"] == "ready" and "first 30 requests" in model["ood"]["source"]


async def test_scoring_off_gives_no_fields_and_no_drift(start_server, http, bundled) -> None:
    server = await start_server(captioner=load_captioner(str(bundled_model_dir())), ood=False)
    (result,) = await _caption_all(http, server.url, list(scene_images(HELD_OUT_SEED, 1)))
    assert "ood_score" not in result
    model, figures = await _state(http, server.url)
    assert model["ood"] == {"enabled": False} and "drift" not in model
    assert "captionfleet_feature_drift" not in figures
