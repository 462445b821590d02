"""Fixtures shared by the engine, training and evaluation tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import skimage.data
import torch
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
"""Real photos that ship with scikit-image (no download)."""


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small models on shared CPUs: torch's thread pool only adds spin-waiting (50x slower when the
    cores are busy), so these tests run single-threaded and put the setting back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]
