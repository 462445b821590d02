"""Request bodies in a ``Content-Encoding``: decoded by the edge, strictly and within the body limit.

aiohttp decodes gzip and deflate bodies as they are read, but it accepts a gzip stream that is cut off
(no end, no checksum) as if it were whole, so a truncated upload would be captioned as whatever its
first part decodes to. The edge's listener turns aiohttp's decoding off (``auto_decompress=False``)
and decodes here instead: the body (at most ``limit`` bytes as sent) is decoded in steps that never
produce more than ``limit`` bytes (a compression bomb is a 413 with bounded memory), and a stream that
does not end where the body ends, or is followed by other bytes, is a 400 ``invalid_body``.

Only ``gzip`` and ``deflate`` (zlib-wrapped or raw, as browsers send it) are decoded; the middleware
refuses any other coding with 415 before the body is read.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from aiohttp import StreamReader

from captionfleet.runtime.web.body import BodyAllowance, read_all
from captionfleet.runtime.web.errors import InvalidRequest, PayloadTooLarge

DECODED_CODINGS = frozenset({"gzip", "deflate"})
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_STEP = 256 * 1024


def content_coding(headers: Mapping[str, str]) -> str:
    """The body's coding, lower case; ``identity`` when none is given."""
    return headers.get("Content-Encoding", "identity").strip().lower() or "identity"


def decode_body(raw: bytes, coding: str, limit: int, what: str = "request body") -> bytes:
    """``raw`` decoded from ``coding`` (``identity``: as it is); 413 past ``limit`` decoded bytes, 400
    for a stream that is not whole."""
    if coding == "identity":
        return raw
    if not raw:
        return raw  # an empty body in any coding is an empty body
    wbits = _GZIP_WBITS if coding == "gzip" else zlib.MAX_WBITS if raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    pieces: list[bytes] = []
    total = 0
    pending, piece = raw, b""
    try:
        # A full step may leave output inside the decoder even when all input is taken: step on.
        while not decoder.eof and (pending or len(piece) == _STEP):
            piece = decoder.decompress(pending, _STEP)
            total += len(piece)
            if total > limit:
                raise PayloadTooLarge(f"the {what} decodes to more than the limit of {limit} bytes")
            pieces.append(piece)
            pending = decoder.unconsumed_tail
    except zlib.error as exc:
        raise InvalidRequest(f"the {what} is not valid {coding}: {exc}", code="invalid_body") from exc
    if not decoder.eof:
        raise InvalidRequest(f"the {what} is cut off: its {coding} stream does not end", code="invalid_body")
    if decoder.unused_data:
        raise InvalidRequest(
            f"the {what} has bytes after the end of its {coding} stream", code="invalid_body"
        )
    return b"".join(pieces)


async def read_decoded(
    headers: Mapping[str, str], stream: StreamReader, allowance: BodyAllowance, limit: int
) -> bytes:
    """A request's whole body, decoded per ``headers``; the decoded bytes count in ``allowance`` too
    (both are held until the answer)."""
    raw = await read_all(stream, allowance, limit)
    coding = content_coding(headers)
    if coding == "identity":
        return raw
    decoded = decode_body(raw, coding, limit)
    await allowance.keep(len(decoded))
    return decoded
