"""What the edge's middleware records on every request, for the handlers of both processes."""

from __future__ import annotations

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


def ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)
