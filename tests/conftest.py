"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from captionfleet.runtime.engine.testing import save_tiny_blip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLIP in save_pretrained format, written once per session (read-only for tests)."""
    return save_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")
