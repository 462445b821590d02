"""The operator context's per-CaptionModel lock, let go of while a quality gate run waits on pods."""

from __future__ import annotations

import asyncio

import pytest

from captionfleet.operator.context import OperatorContext
from captionfleet.operator.settings import OperatorSettings

DEADLINE_S = 10.0


async def test_released_lets_others_in_and_takes_the_lock_back() -> None:
    memo = OperatorContext.create(OperatorSettings())
    lock = memo.lock("uid-1")
    reconciled = asyncio.Event()

    async def reconcile() -> None:
        async with memo.lock("uid-1"):
            reconciled.set()

    async with lock:
        async with memo.released("uid-1"):
            other = asyncio.create_task(reconcile())
            async with asyncio.timeout(DEADLINE_S):
                await reconciled.wait()  # it got in while the gate's run was still going
            await other
        assert lock.locked()  # held again for what follows the run
    assert not lock.locked()


async def test_released_without_the_lock_held_changes_nothing() -> None:
    memo = OperatorContext.create(OperatorSettings())
    async with memo.released("uid-1"):
        assert not memo.lock("uid-1").locked()
    assert not memo.lock("uid-1").locked()


async def test_cancelled_while_another_holds_the_lock_it_still_takes_it_back_before_ending() -> None:
    memo = OperatorContext.create(OperatorSettings())
    lock = memo.lock("uid-1")
    inside, took, let_go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    held_at_exit: list[bool] = []

    async def daemon() -> None:
        async with lock:
            try:
                async with memo.released("uid-1"):
                    inside.set()
                    await asyncio.Event().wait()  # a gate run, until cancelled
            finally:
                held_at_exit.append(lock.locked())

    async def reconcile() -> None:
        async with lock:
            took.set()
            await let_go.wait()

    task = asyncio.create_task(daemon())
    async with asyncio.timeout(DEADLINE_S):
        await inside.wait()
    other = asyncio.create_task(reconcile())
    async with asyncio.timeout(DEADLINE_S):
        await took.wait()  # the reconciliation holds it
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # waits for the lock rather than ending without it
    let_go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await other
    assert held_at_exit == [True] and not lock.locked()
