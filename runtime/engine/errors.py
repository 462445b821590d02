"""The engine's domain errors.

Each carries a stable machine ``code``; the HTTP layer maps the classes to statuses (one module does
that, not this one), so nothing here knows about HTTP.
"""

from __future__ import annotations

from captionfleet.errors import CodedError


class EngineError(CodedError):
    """Base of every error the engine raises on purpose."""


class InvalidImage(EngineError):
    """The bytes claim an allowed image format but cannot be decoded: empty, truncated or corrupt."""


class UnsupportedImageFormat(EngineError):
    """The content is not an image in one of the allowed formats (sniffed from the bytes, not headers)."""


class ImageTooLarge(EngineError):
    """The image has more pixels than allowed: refused before its pixel data is decoded."""


class InvalidOptions(EngineError):
    """A generation option (num_beams, max_new_tokens, suggestions, style, prompt) is out of range."""


class ModelLoadError(EngineError):
    """The model or its processor could not be loaded from the given source."""

    code = "model_load_failed"
