"""What a client asks to caption: an image's bytes, or a URL fetched (through the SSRF guard) when it is.

One value type for every path that carries an image before it is captioned: the HTTP edge's parsed
request (``captionfleet.runtime.web.parsing``), a job's items and the item a replica starts on
(``jobs``), so that the rule "exactly one of the two" is written once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSource:
    """One image: its bytes (``data``), or a URL to fetch (``url``); exactly one is set."""

    data: bytes | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.url is None):
            raise ValueError("an ImageSource holds exactly one of data and url")
