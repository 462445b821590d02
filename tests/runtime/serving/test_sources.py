"""ImageSource: one value type for an image to caption, bytes or URL, exactly one of them."""

from __future__ import annotations

import pytest

from captionfleet.runtime.serving.sources import ImageSource


def test_an_image_source_holds_bytes_or_a_url() -> None:
    assert ImageSource(data=b"").data == b""  # empty bytes are bytes (sniffing refuses them later)
    assert ImageSource(url="http://example.com/a.png").url == "http://example.com/a.png"


@pytest.mark.parametrize("given", [{}, {"data": b"x", "url": "http://example.com/a.png"}])
def test_an_image_source_with_neither_or_both_is_refused(given: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImageSource(**given)  # type: ignore[arg-type]
