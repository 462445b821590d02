"""The calls the client makes, with the contract's errors and its retry rule.

A 429, 502, 503 or 504 is retried after its ``Retry-After`` (else a growing pause), at most
``retries`` times, as is a call that got no answer at all; any other error answer is an
:class:`ApiError` with the contract's code and message. A job's submission is not idempotent: it is
retried only when the server cannot have acted on it (429 or 503 refuse it before any work, a
connection that was never made), so a job is never submitted twice. Bodies are read whole, except a
job's results, which are read line by line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from captionfleet.client.settings import CaptionSettings
from captionfleet.names import API_KEY_HEADER, PRIORITY_HEADER, USER_ID_HEADER

RETRIED = frozenset({429, 502, 503, 504})  # 504: a busy fleet let the deadline pass
RETRIED_ONCE_ONLY = frozenset({429, 503})  # what a call that must not run twice may retry
MAX_WAIT_S = 60.0  # the longest Retry-After honoured


class ApiError(Exception):
    """An error answer (or none at all, after the retries): the contract's code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def error_of(status: int, body: bytes) -> ApiError:
    """The contract's ``{"error": {"code", "message"}}``, or what can be said of another body."""
    try:
        error = json.loads(body)["error"]
        return ApiError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(status, f"http_{status}", body[:200].decode("utf-8", "replace") or "no body")


def _wait_s(response: aiohttp.ClientResponse, attempt: int) -> float:
    try:
        return min(MAX_WAIT_S, max(0.0, float(response.headers.get("Retry-After", ""))))
    except ValueError:
        return min(MAX_WAIT_S, 2.0**attempt)


class Api:
    """One endpoint, its key and user, over one HTTP client."""

    def __init__(self, session: aiohttp.ClientSession, settings: CaptionSettings) -> None:
        self.session = session
        self.settings = settings
        self.base = settings.endpoint.rstrip("/")
        self.headers = {PRIORITY_HEADER: "bulk"}  # never ahead of interactive users
        if settings.api_key:
            self.headers[API_KEY_HEADER] = settings.api_key
        if settings.user_id:
            self.headers[USER_ID_HEADER] = settings.user_id

    async def json(self, method: str, path: str, *, once: bool = False, **request: Any) -> dict[str, Any]:
        """The JSON object of a successful answer; ApiError otherwise. ``once``: a call that must not
        be carried out twice (a job's submission)."""
        async with self.request(method, path, once=once, **request) as response:
            body = await response.read()
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise ApiError(response.status, "bad_answer", f"{method} {path} did not answer a JSON object")
        return document

    def request(self, method: str, path: str, *, once: bool = False, **request: Any) -> _Call:
        """``async with api.request(...) as response``: a successful response, after the retries."""
        return _Call(self, method, path, request, once)

    async def lines(self, path: str) -> AsyncIterator[bytes]:
        """The lines of a JSON Lines answer, as they arrive."""
        async with self.request("GET", path) as response:
            async for line in response.content:
                if line.strip():
                    yield line.rstrip(b"\r\n")


class _Call:
    def __init__(self, api: Api, method: str, path: str, request: Mapping[str, Any], once: bool) -> None:
        self.api, self.method, self.path, self.request = api, method, path, dict(request)
        self.retried = RETRIED_ONCE_ONLY if once else RETRIED
        self.unsent: tuple[type[BaseException], ...] = (
            (aiohttp.ClientConnectorError,) if once else (aiohttp.ClientError, TimeoutError)
        )
        self.response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        api = self.api
        headers = {**api.headers, **self.request.pop("headers", {})}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=api.settings.timeout_s)
        for attempt in range(api.settings.retries + 1):
            last = attempt == api.settings.retries
            try:
                response = await api.session.request(
                    self.method, api.base + self.path, headers=headers, timeout=timeout, **self.request
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                if last or not isinstance(exc, self.unsent):
                    raise ApiError(0, "unreachable", f"{api.base}: {type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(min(MAX_WAIT_S, 2.0**attempt))
                continue
            if response.status < 400:
                self.response = response
                return response
            body = await response.read()
            response.release()
            if response.status not in self.retried or last:
                raise error_of(response.status, body)
            await asyncio.sleep(_wait_s(response, attempt))
        raise AssertionError("unreachable")  # the loop returns or raises

    async def __aexit__(self, *exc: object) -> None:
        if self.response is not None:
            self.response.release()
