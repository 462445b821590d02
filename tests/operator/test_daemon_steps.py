"""A daemon's step against kopf's stop flag (handlers._unless_stopped): a step in progress ends when the
daemon is stopped, and what it raises on its way out is not the daemon's failure."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from captionfleet.operator.handlers import _unless_stopped

DEADLINE_S = 10.0


class Stopped:
    """What the step sees of kopf's DaemonStopped: ``wait()``."""

    def __init__(self) -> None:
        self.flag = asyncio.Event()

    async def wait(self) -> None:
        await self.flag.wait()


class Outcome:
    interval_s = 1.0
    events: ClassVar[list[Any]] = []
    model = None


async def test_a_step_that_ends_first_gives_its_outcome_or_its_error() -> None:
    async def step() -> Outcome:
        return Outcome()

    async def failing() -> Outcome:
        raise LookupError("the API refused")

    assert isinstance(await _unless_stopped(Stopped(), step()), Outcome)  # type: ignore[arg-type]
    with pytest.raises(LookupError):
        await _unless_stopped(Stopped(), failing())  # type: ignore[arg-type]


async def test_stopping_ends_a_step_in_progress_and_what_it_raises_on_the_way_out_is_dropped() -> None:
    stopped, started, ended = Stopped(), asyncio.Event(), asyncio.Event()

    async def gate_run() -> Outcome:
        started.set()
        try:
            await asyncio.Event().wait()  # a gate run waiting on a wedged pod
        finally:
            ended.set()
            raise RuntimeError("Session is closed")  # its clients went first
        return Outcome()

    task = asyncio.create_task(_unless_stopped(stopped, gate_run()))  # type: ignore[arg-type]
    async with asyncio.timeout(DEADLINE_S):
        await started.wait()
        stopped.flag.set()
        assert await task is None
    assert ended.is_set()


async def test_a_cancelled_daemon_is_cancelled_not_failed_by_its_steps_error() -> None:
    started = asyncio.Event()

    async def step() -> Outcome:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("Session is closed")
        return Outcome()

    task = asyncio.create_task(_unless_stopped(Stopped(), step()))  # type: ignore[arg-type]
    async with asyncio.timeout(DEADLINE_S):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
