"""The shared error base: a class's code is its name in snake case unless it names its own."""

from __future__ import annotations

from captionfleet.errors import CodedError, snake_case
from captionfleet.runtime.engine.errors import ImageTooLarge, ModelLoadError
from captionfleet.runtime.router.errors import UpstreamTimeout
from captionfleet.runtime.serving.errors import QueueFull
from captionfleet.runtime.web.errors import UrlFetchFailed


def test_a_code_is_the_class_name_in_snake_case_unless_the_class_gives_one() -> None:
    assert snake_case("ImageTooLarge") == "image_too_large"
    assert (ImageTooLarge.code, QueueFull.code, UrlFetchFailed.code) == (
        "image_too_large",
        "queue_full",
        "url_fetch_failed",
    )
    assert ModelLoadError.code == "model_load_failed"  # its own, kept
    assert UpstreamTimeout.code == "deadline_exceeded"

    class SomethingOdd(QueueFull):
        code = "odd"

    class SomethingOdder(SomethingOdd):
        pass

    assert SomethingOdd.code == "odd" and SomethingOdder.code == "something_odder"
    assert CodedError("x", code="given").code == "given"
