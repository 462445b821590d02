"""What the edge's middleware records on every request, for the handlers of both processes."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from captionfleet.runtime.web.body import BodyAllowance

REQUEST_ID = web.RequestKey("request_id", str)
ARRIVED = web.RequestKey("arrived", float)
"""Monotonic seconds (``time.monotonic()``) at which the request's headers were in."""
DEADLINE = web.RequestKey("deadline", float)
"""Monotonic seconds by which the request must be answered; inf: none."""
BODY = web.RequestKey("body", BodyAllowance)
"""The request's share of the process's body budget (``web.body``)."""
CONTINUE_DEFERRED = web.RequestKey("continue_deferred", bool)
"""The client waits for ``100 Continue`` before it sends the body (``protocol.defer_continue``)."""
BACKSTOP = web.RequestKey("backstop", asyncio.Timeout)
"""The edge's deadline timer of the request (absent without a deadline): see :func:`head_sent`."""


def ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)


def head_sent(request: web.Request) -> None:
    """A streamed answer's status and headers are out: the deadline bounded getting there, and the
    edge's timer must not cut the body short (which could only truncate it: no error can follow a
    200). The handler bounds the time between its chunks instead."""
    timer = request.get(BACKSTOP)
    if timer is not None:
        timer.reschedule(None)
