"""Exact repeats answered by the router while a version has no ready pod (scale to zero's item 3).

With ``redis_url`` (the runtimes' shared cache), a ``POST /v1/caption`` for a cold version is parsed
as the server parses it (``web/parsing.py``) and looked up under the server's key for it
(``serving/repeats.py``: model version, option fields, digest of the image's bytes). A hit is the
answer, ``cached: true``, with no hold and no pod woken (it is not counted in ``held`` nor in
``last_request_at``); a miss, a body that does not parse, an image given by URL, or a Redis that does
not answer is held as any other request.
"""

from __future__ import annotations

from typing import Any

from captionfleet.runtime.router.proxy import Outgoing
from captionfleet.runtime.serving.repeats import RepeatStore, body_digest, repeat_key
from captionfleet.runtime.web.errors import EdgeError
from captionfleet.runtime.web.parsing import BufferedBody, FormLimits, parse_source

CAPTION_PATH = "/v1/caption"


class RouterRepeats:
    """Reads the answers the runtimes kept for exact repeats."""

    def __init__(self, redis_url: str, limits: FormLimits) -> None:
        self.store = RepeatStore(redis_url, ttl_s=0.0)  # reads only: the runtimes write, with their TTL
        self.limits = limits

    async def answer(self, version: str, outgoing: Outgoing) -> dict[str, Any] | None:
        """The kept answer of ``version`` to this caption request, or None."""
        if outgoing.method != "POST" or outgoing.path_qs.partition("?")[0] != CAPTION_PATH:
            return None
        body = BufferedBody(outgoing.headers, outgoing.path_qs, outgoing.body)
        try:
            parsed = await parse_source(body, body.allowance(), self.limits, batch=False)
        except EdgeError:
            return None  # the runtime will say what is wrong with it
        image = parsed.images[0].data
        if image is None:
            return None  # a URL: its bytes are not known without fetching it
        return await self.store.get(repeat_key(version, parsed.fields, body_digest(image)))

    async def close(self) -> None:
        await self.store.close()
