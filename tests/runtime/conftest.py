"""Fixtures shared by the runtime's tests: torch threads, real photos, a real Redis.

- ``redis_url``: a ``redis-server`` subprocess on a free port (Debian's package; ``make test``
  installs it), for the cache tests of the data plane and the server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import skimage.data
import torch
from PIL import Image

from captionfleet.runtime.server.testing import RedisProcess

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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for this test session."""
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield redis.url
    redis.stop()
