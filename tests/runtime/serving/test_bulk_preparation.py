"""Bulk preparation waits for interactive preparation (``bulk_prepare_concurrency``): on the real
service and the tiny model, a bulk image is not decoded while an interactive request is on its way,
and it is once none is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from captionfleet.runtime.engine.captioner import Captioner
from captionfleet.runtime.engine.types import Caption
from captionfleet.runtime.server.testing import encode, eventually, shapes_image
from captionfleet.runtime.serving.batcher import Priority
from captionfleet.runtime.serving.service import CaptionResult, CaptionService
from captionfleet.settings.serve import ServeSettings


def settings(model_dir: Path, bulk_prepare_concurrency: int) -> ServeSettings:
    return ServeSettings(
        model=str(model_dir), num_beams=1, max_new_tokens=8, preprocess_workers=2, cache_size=0,
        ood_reference_requests=0, bulk_prepare_concurrency=bulk_prepare_concurrency,
    )  # fmt: skip


class Figures:
    """What the service reports (the server's metrics stand-in): how many images were prepared."""

    def __init__(self) -> None:
        self.prepared = 0

    def preprocessed(self, seconds: float) -> None:
        self.prepared += 1

    def cache_lookup(self, hit: bool) -> None:
        pass

    def captioned(self, caption: Caption) -> None:
        pass

    def answered(self, caption: Caption) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, size: int, queue_waits: Sequence[float], inference_s: float) -> None:
        pass


@contextlib.asynccontextmanager
async def started(
    model_dir: Path, captioner: Captioner, limit: int
) -> AsyncIterator[tuple[CaptionService, Figures]]:
    """The real service with ``bulk_prepare_concurrency=limit``, started (warm-up done), closed after."""
    figures = Figures()
    service = CaptionService(captioner, settings(model_dir, limit), figures, None)
    await service.start()
    try:
        yield service, figures
    finally:
        await service.close(10.0)


def bulk_task(service: CaptionService) -> asyncio.Task[CaptionResult]:
    image = encode(shapes_image(1))
    return asyncio.create_task(service.caption(image, service.resolve_options({}), None, Priority.BULK))


async def test_a_bulk_image_is_prepared_only_once_no_interactive_one_is(
    tiny_model_dir: Path, tiny_captioner: Captioner
) -> None:
    async with started(tiny_model_dir, tiny_captioner, 1) as (service, figures):
        before = figures.prepared
        with service.batcher.preparing():  # an interactive request on its way (reading its body)
            bulk = bulk_task(service)
            await service.caption(encode(shapes_image(2)), service.resolve_options({}), None)
            assert figures.prepared == before + 1  # the interactive image only
            assert not bulk.done()
        await bulk
        assert figures.prepared == before + 2


async def test_without_the_limit_bulk_images_are_prepared_at_once(
    tiny_model_dir: Path, tiny_captioner: Captioner
) -> None:
    async with started(tiny_model_dir, tiny_captioner, 0) as (service, figures):
        before = figures.prepared
        with service.batcher.preparing():
            bulk = bulk_task(service)
            await eventually(lambda: figures.prepared == before + 1, 30, "the bulk image's preparation")
            assert not bulk.done()  # prepared, but the model takes no bulk batch while one is on its way
        await bulk
