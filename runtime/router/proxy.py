"""Forwarding one request to a version's runtimes: endpoint choice, the single retry, the deadline.

- Endpoints of a version take turns (round robin, per router process); endpoints that refuse
  connections or hang are taken out of rotation and probed until they are back (``balancer.py``), and
  when all of a version's are out the answer is 503 at once, not a wait for a hung pod.
- A connection failure (refused, reset, dropped before the answer, connect timeout) or a 503 answer
  gets one more attempt on another endpoint of the *same* version, with the same ``X-Request-Id``:
  the user's version never changes behind their back. With a single endpoint (a Service address, where
  kube-proxy picks a pod per connection) the retry goes to the same address.
- The request's budget (``X-Request-Timeout-Ms``: what the client allows, at most the router's
  ``request_timeout_ms``) covers both attempts; each attempt tells the runtime what is left of it in
  ``X-Request-Timeout-Ms``, in whole milliseconds. When it is spent the answer is 504 and there is no
  retry.
- The body is read once by the edge, up to ``max_body_bytes`` (bounded, so it can be sent twice),
  and the answer up to ``max_response_bytes``; the runtime's status, headers and body are relayed
  unchanged (once ``relay.py`` found them a runtime's answer), so its ``model_version`` says who
  answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from captionfleet.names import REQUEST_ID_HEADER, TIMEOUT_HEADER
from captionfleet.runtime.router.balancer import Balancer as Balancer
from captionfleet.runtime.router.errors import BadUpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from captionfleet.runtime.router.relay import check_sendable, check_status, checked_body, with_retry_after
from captionfleet.runtime.router.table import Version
from captionfleet.runtime.web.context import DEADLINE, REQUEST_ID
from captionfleet.runtime.web.parsing import is_text

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 64 * 1024
UNREACHABLE_RETRY_AFTER_S = 1.0  # a 502 for unreachable runtimes: pods restart or move within seconds

# Hop-by-hop headers (RFC 9110 7.6.1) and those the HTTP client or server computes itself.
_NOT_FORWARDED = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Expect", TIMEOUT_HEADER,
        REQUEST_ID_HEADER,
        # The router's server has decoded a gzip/deflate/br body already: it is sent on as it is.
        "Content-Encoding",
    )
)  # fmt: skip
_NOT_RELAYED = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Content-Length", "Date", "Server",
    )
)  # fmt: skip


@dataclass(frozen=True)
class Outgoing:
    """One request as the router sends it on (the same for the retry)."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    request_id: str
    deadline: float  # monotonic seconds: the budget of both attempts


def outgoing_of(request: web.Request, body: bytes, path_qs: str | None = None) -> Outgoing:
    """The client's request as the router sends it on: its path (or ``path_qs``), the forwarded
    headers, ``body`` (read by the edge), its request id and deadline."""
    return Outgoing(
        request.method,
        request.rel_url.raw_path_qs if path_qs is None else path_qs,
        forwarded_headers(request.headers, request.remote),
        body,
        request[REQUEST_ID],
        request[DEADLINE],
    )


@dataclass(frozen=True)
class UpstreamAnswer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    endpoint: str


class _ConnectFailed(Exception):
    """One attempt could not reach its endpoint (the caller decides about the retry); ``unsent``: the
    connection was never made, so the runtime cannot have acted on the request."""

    def __init__(self, message: str, *, unsent: bool) -> None:
        super().__init__(message)
        self.unsent = unsent


def forwarded_headers(
    incoming: Mapping[str, str] | CIMultiDictProxy[str], remote: str | None
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (those named in ``Connection`` too, RFC 9110
    7.6.1) and those whose value is not UTF-8, plus X-Forwarded-For.

    aiohttp's client cannot send a value's bytes as they came: it would cut the bytes that are not
    UTF-8 out of it (``\xffsecret`` forwarded as ``secret``), so the runtime would read another value
    than a direct client's request gives. Such a header is dropped whole: a runtime refuses a
    non-UTF-8 ``X-API-Key`` (401) either way, and reads no other header the router lets through."""
    nominated = {
        token.strip().lower()
        for name, value in incoming.items()
        if name.lower() == "connection"
        for token in value.split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in _NOT_FORWARDED and name.lower() not in nominated and is_text(value):
            headers.add(name, value)
    if remote:
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    return headers


def relayed_headers(incoming: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming:
        if name.lower() not in _NOT_RELAYED:
            headers.add(name, value)
    return headers


PROBE_MAX_BYTES = 64 * 1024  # a runtime's /readyz answer is a few hundred bytes


async def read_within(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body of ``response``, or None when it has (or declares) more than ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def probe_readyz(session: aiohttp.ClientSession, endpoint: str, timeout_s: float) -> bool:
    """Whether ``endpoint`` answers ``GET /readyz`` as a runtime does, within ``timeout_s``: 200 and
    ``{"ready": true, ...}`` (a broken runtime whose port answers anything with a 200 stays out).
    Raises RuntimeError once ``session`` is closed (the probe's task then ends)."""
    try:
        async with session.get(
            endpoint + "/readyz", timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as response:
            body = await read_within(response, PROBE_MAX_BYTES) if response.status == 200 else None
            if body is None:
                return False
            answer = json.loads(body)
            return isinstance(answer, dict) and answer.get("ready") is True
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, RecursionError):  # bad JSON too
        return False


@dataclass(eq=False)  # one per router, compared by identity
class Forwarder:
    """Sends requests to runtimes over one pooled HTTP client (which the balancer's probes use too)."""

    session: aiohttp.ClientSession
    balancer: Balancer
    connect_timeout_s: float = field(kw_only=True)
    retry: bool = field(kw_only=True)
    max_response_bytes: int = field(kw_only=True)
    max_headers: int = field(kw_only=True, default=128)  # the router's own edge limits (relay.py)
    max_header_bytes: int = field(kw_only=True, default=8190)

    def __post_init__(self) -> None:
        probe_timeout_s = self.balancer.policy.probe_timeout_s
        self.balancer.use_probe(functools.partial(probe_readyz, self.session, timeout_s=probe_timeout_s))

    async def forward(
        self,
        version: Version,
        outgoing: Outgoing,
        on_retry: Callable[[str], None] = lambda reason: None,
        *,
        once: bool = False,
    ) -> UpstreamAnswer:
        """The runtime's answer; raises UpstreamTimeout, UpstreamUnreachable, NoLiveEndpoint (every
        endpoint ejected: 503) or BadUpstreamResponse.

        ``on_retry(reason)`` is called before the second attempt, reason ``connect`` or ``status_503``.
        ``once``: a request that must not be carried out twice (a job's submission) is sent again only
        after a 503 or a connection that was never made, never after one dropped once it was sent.
        """
        first, answer, retried = await self._reach(
            version, functools.partial(self._attempt, outgoing=outgoing), on_retry, once=once
        )
        if not retried and answer.status == 503 and self.retry and time.monotonic() < outgoing.deadline:
            on_retry("status_503")
            try:
                return await self._attempt(self.balancer.choose(version, avoid=first), outgoing)
            except (_ConnectFailed, UpstreamTimeout):
                return answer  # the first runtime's 503, with its Retry-After
        return answer

    @contextlib.asynccontextmanager
    async def stream(
        self,
        version: Version,
        outgoing: Outgoing,
        idle_timeout_s: float,
        on_retry: Callable[[str], None] = lambda reason: None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The runtime's response once its head is in (within the request's budget, with the retry
        after a connection failure), for the caller to relay its body as it comes: each read waits at
        most ``idle_timeout_s`` (``aiohttp.ServerTimeoutError``). Nothing is retried once a byte of
        the body may have been relayed."""
        _, response, _ = await self._reach(
            version,
            functools.partial(self._open, outgoing=outgoing, idle_timeout_s=idle_timeout_s, streamed=True),
            on_retry,
        )
        async with response:
            yield response

    async def _reach(
        self,
        version: Version,
        attempt: Callable[[str], Awaitable[T]],
        on_retry: Callable[[str], None],
        *,
        once: bool = False,
    ) -> tuple[str, T, bool]:
        """(the endpoint of the first attempt, the answer, whether it came from a retry): after a
        connection failure, one more attempt on another endpoint of the same version."""
        first = self.balancer.choose(version)
        try:
            return first, await attempt(first), False
        except _ConnectFailed as exc:
            log.warning("runtime unreachable", extra={"version": version.name, "error": str(exc)})
            if once and not exc.unsent:
                raise UpstreamUnreachable(
                    f"the runtime of version {version.name} dropped the connection before answering; the "
                    "request may have been carried out, so it is not sent again",
                    retry_after=UNREACHABLE_RETRY_AFTER_S,
                ) from exc
            if not self.retry:
                raise UpstreamUnreachable(
                    f"no runtime of version {version.name} could be reached",
                    retry_after=UNREACHABLE_RETRY_AFTER_S,
                ) from exc
        on_retry("connect")
        try:
            return first, await attempt(self.balancer.choose(version, avoid=first)), True
        except _ConnectFailed as again:
            log.warning(
                "runtime unreachable on the retry", extra={"version": version.name, "error": str(again)}
            )
            raise UpstreamUnreachable(
                f"no runtime of version {version.name} could be reached, on the retry either",
                retry_after=UNREACHABLE_RETRY_AFTER_S,
            ) from again

    def _remaining(self, outgoing: Outgoing) -> float:
        remaining = outgoing.deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout("the request's deadline passed before a runtime answered")
        return remaining

    def _headers(self, outgoing: Outgoing, remaining: float) -> CIMultiDict[str]:
        sent = CIMultiDict(outgoing.headers)
        sent[REQUEST_ID_HEADER] = outgoing.request_id
        sent[TIMEOUT_HEADER] = str(max(1, int(remaining * 1000)))
        check_sendable(sent, max_headers=self.max_headers, max_header_bytes=self.max_header_bytes)
        return sent

    async def _attempt(self, url: str, outgoing: Outgoing) -> UpstreamAnswer:
        """One request and its whole answer, within the request's budget."""
        remaining = self._remaining(outgoing)
        try:
            async with asyncio.timeout(remaining) as budget:
                response = await self._open(url, outgoing, None)
                async with response:
                    try:
                        content = await self.read_answer(response, url)
                    except aiohttp.ClientConnectionError as exc:  # dropped before the answer was in
                        raise _ConnectFailed(f"{url}: {type(exc).__name__}: {exc}", unsent=False) from exc
                    except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
                        log.warning("runtime answer cut short", extra={"endpoint": url, "error": str(exc)})
                        self._refuse(response, url)
                        raise BadUpstreamResponse("the runtime's answer was cut short") from exc
                    try:
                        content = checked_body(response.status, content, outgoing.request_id, outgoing.method)
                    except BadUpstreamResponse as exc:
                        log.warning("runtime answer not relayed", extra={"endpoint": url, "error": str(exc)})
                        self._refuse(response, url)
                        raise
                self.balancer.succeeded(url)
                headers = with_retry_after(response.status, relayed_headers(response.headers.items()))
                return UpstreamAnswer(response.status, headers, content, url)
        except TimeoutError as exc:
            self._check_budget(budget, url, remaining, exc)
            raise

    async def _open(
        self, url: str, outgoing: Outgoing, idle_timeout_s: float | None, *, streamed: bool = False
    ) -> aiohttp.ClientResponse:
        """The response once its status and headers are in, within the request's budget; its body
        unread (each read of it waits at most ``idle_timeout_s``; None: no limit of its own).
        ``streamed``: the body is relayed as it comes, so a good head is the endpoint's good answer;
        otherwise the caller reads the body and tells the balancer."""
        remaining = self._remaining(outgoing)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(self.connect_timeout_s, remaining), sock_read=idle_timeout_s
        )
        headers = self._headers(outgoing, remaining)
        try:
            async with asyncio.timeout(remaining) as budget:
                try:
                    response = await self.session.request(
                        outgoing.method,
                        url + outgoing.path_qs,
                        headers=headers,
                        data=outgoing.body,
                        timeout=timeout,
                        allow_redirects=False,
                    )
                except aiohttp.ClientConnectionError as exc:
                    # Only a connection that could not be made counts against the endpoint: one dropped
                    # once the request went out (a reset, a kept-alive connection the runtime closed)
                    # is retried, and a pod that is gone refuses the retry's connection.
                    unsent = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
                    if unsent:
                        self.balancer.connect_failed(url)
                    raise _ConnectFailed(f"{url}: {type(exc).__name__}: {exc}", unsent=unsent) from exc
                except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
                    log.warning("runtime answer is not HTTP", extra={"endpoint": url, "error": str(exc)})
                    self.balancer.bad_response(url)
                    raise BadUpstreamResponse("the runtime's answer is not valid HTTP") from exc
                except (aiohttp.InvalidURL, ValueError) as exc:  # the table checks URLs; never a 500
                    log.error("endpoint URL not usable", extra={"endpoint": url, "error": str(exc)})
                    raise BadUpstreamResponse("the version's endpoint address is not usable") from exc
        except TimeoutError as exc:
            self._check_budget(budget, url, remaining, exc)
            raise
        try:
            check_status(response.status)
        except BadUpstreamResponse as exc:
            log.warning("runtime answer not relayed", extra={"endpoint": url, "error": str(exc)})
            self._refuse(response, url)  # a connection that switched protocols, or after a redirect
            raise
        if streamed:
            self.balancer.succeeded(url)
        return response

    def _refuse(self, response: aiohttp.ClientResponse, url: str) -> None:
        """An answer not relayed: its connection is never reused, and it counts against the endpoint."""
        response.close()
        self.balancer.bad_response(url)

    def _check_budget(self, budget: asyncio.Timeout, url: str, remaining: float, exc: TimeoutError) -> None:
        """A timeout of the request's budget is the endpoint's (504); any other one is re-raised."""
        if budget.expired():
            self.balancer.timed_out(url, remaining)
            raise UpstreamTimeout(
                f"no answer from the runtime within the request's budget ({remaining * 1000:.0f} ms)"
            ) from exc

    async def read_answer(self, response: aiohttp.ClientResponse, url: str) -> bytes:
        """The whole answer, up to ``max_response_bytes`` (BadUpstreamResponse beyond)."""
        limit = self.max_response_bytes
        content = await read_within(response, limit)
        if content is not None:
            return content
        declared = response.content_length
        if declared is not None and declared > limit:
            raise BadUpstreamResponse(f"the runtime's answer has {declared} bytes; the limit is {limit}")
        raise BadUpstreamResponse(f"the runtime's answer has more than {limit} bytes, the limit")
