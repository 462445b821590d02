"""What the router sends to a runtime must fit its parser, and what it relays must be a runtime's answer.

Sent: the router forwards the client's end-to-end headers and adds its own (``X-Forwarded-For``,
``X-Request-Id``, ``X-Request-Timeout-Ms``, ``Host``, ``Content-Length``). A request that fit the
router's ``max_headers`` and ``max_header_bytes`` could then be refused by the runtime's HTTP parser
(the same settings, with the same defaults), whose 400 carries a request id of its own, not the
client's. :func:`check_sendable` checks the request as it will go out against the router's own
limits, so the client gets the router's 400 (``too_many_headers``, ``header_too_large``) with its own
request id and no runtime is asked.

Relayed: only what a runtime answers. A status that is not final (1xx, ``101`` switching protocols), a
redirect (3xx: a runtime never redirects, and a ``Location`` elsewhere must not reach the client), a
status past 599, bytes that are not HTTP, a buffered answer that is not a JSON object (but for a HEAD,
which has no body), or an error that is not in the contract's shape, is a 502 ``bad_upstream_response``
(``Retry-After``), counted in the version's ``bad_responses``; its connection is closed, never reused.
Such answers in a row eject the endpoint (``outlier_bad_responses``, ``balancer.py``). A JSON answer
whose ``request_id`` is not the client's (a runtime's parser refused the request before reading its
id) carries the client's, and a relayed 429, 502 or 503 without ``Retry-After`` gets the contract's
default one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from multidict import CIMultiDict

from captionfleet.runtime.router.errors import BadUpstreamResponse
from captionfleet.runtime.web.errors import DEFAULT_RETRY_AFTER_S, RETRY_STATUSES, InvalidRequest

ADDED_BY_CLIENT = 2
"""Header lines aiohttp's client adds to what the router sets: ``Host`` and ``Content-Length``."""


def check_sendable(headers: Mapping[str, str], *, max_headers: int, max_header_bytes: int) -> None:
    """400 when ``headers`` (what the router sets on the request it sends) would be over the router's
    own header limits once the HTTP client has added its own lines."""
    count = len(headers) + ADDED_BY_CLIENT
    if count > max_headers:
        raise InvalidRequest(
            f"the request has too many headers to be forwarded: {count} with the router's own, over "
            f"max_headers ({max_headers})",
            code="too_many_headers",
        )
    for name, value in headers.items():
        size = max(_size(name), _size(value))
        if size > max_header_bytes:
            raise InvalidRequest(
                f"header {name[:40]!r} would be {size} bytes as forwarded (the router appends to "
                f"X-Forwarded-For), over max_header_bytes ({max_header_bytes})",
                code="header_too_large",
            )


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))  # a header that is not UTF-8 keeps its bytes


def check_status(status: int) -> None:
    """BadUpstreamResponse for a status no runtime answers with (only 2xx, 4xx and 5xx are relayed)."""
    if not (200 <= status < 300 or 400 <= status < 600):
        raise BadUpstreamResponse(f"the runtime answered with status {status}, which it never does")


def checked_body(status: int, body: bytes, request_id: str, method: str) -> bytes:
    """``body``, a buffered answer of ``status`` to a ``method`` request, when it is a runtime's: a JSON
    object, an error in the contract's shape; with ``request_id`` as its ``request_id`` when it had
    another one. An answer to a HEAD has no body (RFC 9110 9.3.2): only its status is checked, else a
    runtime's ``HEAD /v1/jobs/{id}`` 404 was a 502 and counted against its endpoint."""
    check_status(status)
    if method == "HEAD":
        return b""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise BadUpstreamResponse(f"the runtime's {status} answer is not a JSON object")
    if status >= 400 and not _is_contract_error(document):
        raise BadUpstreamResponse(f"the runtime's {status} answer is not an error in the contract's shape")
    if "request_id" in document and document["request_id"] != request_id:
        document["request_id"] = request_id
        return json.dumps(document).encode()
    return body


def with_retry_after(status: int, headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """``headers`` of a relayed answer, with ``Retry-After`` where the contract wants one (429, 502,
    503) and the runtime gave none."""
    if status in RETRY_STATUSES and "Retry-After" not in headers:
        headers["Retry-After"] = str(int(DEFAULT_RETRY_AFTER_S))
    return headers


def _is_contract_error(document: dict[str, Any]) -> bool:
    error = document.get("error")
    return (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message"), str)
    )
