"""The engine's domain errors.

Each carries a stable machine ``code``; the HTTP layer maps the classes to statuses (one module does
that, not this one), so nothing here knows about HTTP.
"""

from __future__ import annotations

from captionfleet.errors import CodedError


class EngineError(CodedError):
    """Base of every error the engine raises on purpose."""

    code: str = "engine_error"


class InvalidImage(EngineError):
    """The bytes claim an allowed image format but cannot be decoded: empty, truncated or corrupt."""

    code = "invalid_image"


class UnsupportedImageFormat(EngineError):
    """The content is not an image in one of the allowed formats (sniffed from the bytes, not headers)."""

    code = "unsupported_image_format"


class ImageTooLarge(EngineError):
    """The image has more pixels than allowed: refused before its pixel data is decoded."""

    code = "image_too_large"


class InvalidOptions(EngineError):
    """A generation option (num_beams, max_new_tokens, suggestions, style, prompt) is out of range."""

    code = "invalid_options"


class ModelLoadError(EngineError):
    """The model or its processor could not be loaded from the given source."""

    code = "model_load_failed"
