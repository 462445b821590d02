"""Request bodies -> images (bytes or URLs) and option fields, within the body size limit.

Accepted, as CONTRACT.md says: ``multipart/form-data`` (field ``image``; ``images`` for the batch
route), a raw body (any other content type: the bytes are sniffed later, never trusted by header), or
JSON ``{"url": ...}`` / ``{"image_base64": ...}`` (``{"images": [...]}`` of those for the batch route).
Options come from the query string and from the body's fields; the body wins.

The body is read through the edge (``captionfleet.runtime.web.body``): a declared Content-Length over
``max_body_bytes`` is refused before reading, a chunked body is cut off as soon as it passes it, and
every byte kept counts against the process's ``max_body_bytes_in_flight``. The query string must be
UTF-8, like a multipart field; JSON nested deeper than any request needs is refused before Python's
recursion limit is reached.

Shared by the server and the router (which parses a body it holds already, :class:`BufferedBody`,
to answer exact repeats from Redis while a version has no pod: ``router/repeats.py``), so both read
the same image bytes and option fields from the same request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from captionfleet.names import PRIORITY_HEADER
from captionfleet.runtime.serving.sources import ImageSource
from captionfleet.runtime.web.body import BodyAllowance, BodyBudget, read_all
from captionfleet.runtime.web.coding import content_coding, read_decoded
from captionfleet.runtime.web.context import BODY
from captionfleet.runtime.web.errors import InvalidRequest

OPTION_FIELDS = ("suggestions", "style", "prompt", "num_beams", "max_new_tokens")
SOURCE_FIELDS = ("url", "image_base64")
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_MAX_FIELD_BYTES = 4096
_CHUNK = 256 * 1024


@dataclass
class ParsedRequest:
    images: list[ImageSource]
    fields: dict[str, Any] = field(default_factory=dict)


class BodySource(Protocol):
    """What parsing reads of a request: an aiohttp request, or a :class:`BufferedBody`."""

    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content(self) -> StreamReader: ...
    @property
    def rel_url(self) -> URL: ...
    async def multipart(self) -> MultipartReader: ...


class BufferedBody:
    """A request whose body was read whole already (the router's), to be parsed as it arrived."""

    def __init__(self, headers: Mapping[str, str], path_qs: str, body: bytes) -> None:
        self.headers = CIMultiDict(headers)
        self.rel_url = URL(path_qs)
        self.content_length: int | None = len(body)
        mimetype = parse_mimetype(self.headers.get("Content-Type", "application/octet-stream"))
        self.content_type = f"{mimetype.type}/{mimetype.subtype}".lower()
        self.content = StreamReader(BaseProtocol(asyncio.get_running_loop()), _CHUNK)
        self.content.feed_data(body)
        self.content.feed_eof()

    async def multipart(self) -> MultipartReader:
        return MultipartReader(self.headers, self.content)

    def allowance(self) -> BodyAllowance:
        """Room for its bytes, apart from the process's budget: they are counted there already."""
        return BodyAllowance(BodyBudget(max(1, self.content_length or 0)), 0, None)


def query_fields(request: BodySource) -> dict[str, str]:
    """The option fields of the query string, decoded as strict UTF-8 (as multipart fields are)."""
    try:
        pairs = urllib.parse.parse_qsl(
            request.rel_url.raw_query_string, keep_blank_values=True, encoding="utf-8", errors="strict"
        )
    except UnicodeDecodeError as exc:
        raise InvalidRequest("the query string is not UTF-8 text", code="invalid_field") from exc
    return {name: value for name, value in pairs if name in OPTION_FIELDS}


@dataclass(frozen=True)
class FormLimits:
    """How much of a request body is parsed: bytes, images, and multipart parts that are not images."""

    max_body_bytes: int
    max_fields: int
    """Most multipart parts that are not images (options, a webhook, unknown ones): each costs a
    parser's work, so a body of thousands of tiny parts would keep a core busy to no end."""
    max_images: int = 1


async def parse_request(request: web.BaseRequest, limits: FormLimits, *, batch: bool) -> ParsedRequest:
    """The images and option fields of a caption (``batch=False``) or batch request."""
    return await parse_source(request, request[BODY], limits, batch=batch)


async def parse_source(
    request: BodySource, allowance: BodyAllowance, limits: FormLimits, *, batch: bool
) -> ParsedRequest:
    """:func:`parse_request` of any body source, its bytes counted in ``allowance``."""
    max_body_bytes = limits.max_body_bytes
    request, allowance = await decoded_source(request, allowance, max_body_bytes)
    fields: dict[str, Any] = dict(query_fields(request))
    content_type = request.content_type.lower()
    if content_type == "multipart/form-data":
        parsed = await _parse_multipart(request, allowance, limits, batch)
    elif content_type == "application/json" or content_type.endswith("+json"):
        body = await read_all(request.content, allowance, max_body_bytes)
        parsed = _parse_json(body, batch)
        _check_image_count(len(parsed.images), limits.max_images, batch)
    elif batch:
        raise InvalidRequest(
            "the batch route takes multipart/form-data with one 'images' field per image, "
            'or JSON {"images": [{"url": ...} | {"image_base64": ...}, ...]}',
            code="unsupported_body",
        )
    else:
        parsed = ParsedRequest([ImageSource(data=await read_all(request.content, allowance, max_body_bytes))])
    fields.update(parsed.fields)
    parsed.fields = fields
    return parsed


async def decoded_source(
    request: BodySource, allowance: BodyAllowance, limit: int
) -> tuple[BodySource, BodyAllowance]:
    """``request`` and ``allowance``, its declared size checked and room for it taken; when its body is
    in a ``Content-Encoding``, a :class:`BufferedBody` of the decoded bytes (``web/coding.py``: counted
    in ``allowance`` already) and that body's own allowance instead."""
    await allowance.reserve_declared(request.content_length, limit)
    if content_coding(request.headers) == "identity":
        return request, allowance
    body = await read_decoded(request.headers, request.content, allowance, limit)
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-encoding"}
    decoded = BufferedBody(headers, str(request.rel_url), body)
    return decoded, decoded.allowance()


def _check_image_count(count: int, most: int, batch: bool) -> None:
    if count <= most:
        return
    if not batch:
        raise InvalidRequest(
            "one image per request here; use POST /v1/caption/batch for several", code="too_many_images"
        )
    raise InvalidRequest(f"more than {most} images in one batch", code="too_many_images")


async def multipart_parts(
    request: BodySource, max_fields: int, image_fields: Collection[str]
) -> AsyncIterator[BodyPartReader]:
    """The parts of a multipart body, one after the other; a malformed body, or one with more than
    ``max_fields`` parts not named in ``image_fields``, is :class:`InvalidRequest`."""
    fields = 0
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # no or a bad boundary
        raise InvalidRequest(f"malformed multipart body: {exc}", code="invalid_multipart") from exc
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:  # bad part headers
            raise InvalidRequest(f"malformed multipart body: {exc}", code="invalid_multipart") from exc
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not supported", code="invalid_multipart")
        if part.name not in image_fields:
            fields += 1
            if fields > max_fields:
                raise InvalidRequest(
                    f"more than {max_fields} multipart fields besides the images", code="too_many_fields"
                )
        yield part


async def text_field(part: BodyPartReader, allowance: BodyAllowance) -> str:
    """A multipart text field (an option, a URL): UTF-8, at most 4 KiB."""
    name = part.name or ""
    raw = await read_all(part, allowance, _MAX_FIELD_BYTES, what=f"field {name!r}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"field {name!r} is not UTF-8 text", code="invalid_field") from exc


async def _parse_multipart(
    request: BodySource, allowance: BodyAllowance, limits: FormLimits, batch: bool
) -> ParsedRequest:
    image_fields = ("images", "image") if batch else ("image",)
    images: list[ImageSource] = []
    fields: dict[str, Any] = {}
    seen: list[str] = []
    budget = limits.max_body_bytes
    async for part in multipart_parts(request, limits.max_fields, image_fields):
        name = part.name or ""
        seen.append(name)
        if name in image_fields:
            _check_image_count(len(images) + 1, limits.max_images, batch)  # before reading it
            data = await read_all(part, allowance, budget)
            budget -= len(data)
            images.append(ImageSource(data=data))
        elif name in OPTION_FIELDS:
            fields[name] = await text_field(part, allowance)
        else:
            budget -= len(await read_all(part, allowance, budget))  # drain it: the next part follows it
    if not images:
        got = ", ".join(repr(n[:40]) for n in seen) or "none"
        raise InvalidRequest(
            f"no image: send it as the multipart field {image_fields[0]!r} (fields received: {got})",
            code="missing_image",
        )
    return ParsedRequest(images, fields)


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (nesting bounded before parsing), or :class:`InvalidRequest`."""
    _check_nesting(body)
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {_short(exc)}", code="invalid_json") from exc
    if not isinstance(document, dict):
        raise InvalidRequest("the JSON body must be an object", code="invalid_json")
    _check_text(document)
    return document


def _check_text(value: object) -> None:
    """Refuse a string (or key) with a lone surrogate (``"\\ud800"``): valid JSON syntax, but no
    Unicode text, so it could not be encoded on the way out (a URL, Redis, a webhook's signature).
    The nesting is bounded already, so the recursion is."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _check_text(key)
            _check_text(inner)
    elif isinstance(value, list):
        for inner in value:
            _check_text(inner)
    elif isinstance(value, str) and not is_text(value):
        raise InvalidRequest(
            "the JSON body holds a lone surrogate (\\ud800-\\udfff): not Unicode text", code="invalid_json"
        )


PRIORITIES = ("interactive", "bulk")


def priority_of(headers: Mapping[str, str]) -> str:
    """The request's ``X-Priority``, ``interactive`` when absent; 400 ``invalid_header`` for any other
    value. One rule for the server and the router, so that neither acts on a header the other refuses
    (the router would take ``\xffbulk`` for interactive while the runtime behind it got ``bulk``)."""
    value = headers.get(PRIORITY_HEADER, PRIORITIES[0]).strip().lower()
    if value not in PRIORITIES:
        raise InvalidRequest(
            f"{PRIORITY_HEADER} must be 'interactive' or 'bulk', not {value[:40]!r}", code="invalid_header"
        )
    return value


def is_text(value: str) -> bool:
    """Whether ``value`` is Unicode text, i.e. holds no lone surrogate: JSON's ``"\\ud800"``, or the
    bytes of a multipart filename that were not UTF-8, which arrive escaped as surrogates."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json(body: bytes, batch: bool) -> ParsedRequest:
    document = json_object(body)
    allowed = {*OPTION_FIELDS, *(("images",) if batch else SOURCE_FIELDS)}
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}",
            code="unknown_field",
        )
    fields = {name: document[name] for name in OPTION_FIELDS if document.get(name) is not None}
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidRequest(f"field {name!r} must be a string or an integer", code="invalid_field")
    if batch:
        entries = document.get("images")
        if not isinstance(entries, list) or not entries:
            raise InvalidRequest(
                '"images" must be a non-empty list of {"url"} or {"image_base64"} objects',
                code="missing_image",
            )
        return ParsedRequest([json_source(entry, f"images[{i}]") for i, entry in enumerate(entries)], fields)
    return ParsedRequest([json_source(document, "body")], fields)


MAX_JSON_DEPTH = 16
"""Deepest nesting of arrays and objects accepted in a JSON body (requests need 3)."""
_JSON_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _check_nesting(body: bytes) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, before the parser recurses into it."""
    depth = 0
    for match in _JSON_BRACKETS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(
                    f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
                )
        elif token in (b"]", b"}"):
            depth -= 1


def _short(error: BaseException, most: int = 200) -> str:
    text = str(error)
    return text if len(text) <= most else text[: most - 3] + "..."


def json_source(entry: object, where: str) -> ImageSource:
    """``{"url": ...}`` or ``{"image_base64": ...}`` (other fields are the caller's to check)."""
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where} must be an object with 'url' or 'image_base64'", code="invalid_field")
    given = [name for name in SOURCE_FIELDS if entry.get(name) is not None]
    if len(given) != 1:
        raise InvalidRequest(f"{where} needs exactly one of 'url' or 'image_base64'", code="missing_image")
    value = entry[given[0]]
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{given[0]} must be a string", code="invalid_field")
    if given[0] == "url":
        return ImageSource(url=value)
    return ImageSource(data=decode_base64(value, where))


def decode_base64(text: str, where: str = "body") -> bytes:
    """Standard or URL-safe base64, with or without padding or a ``data:...;base64,`` prefix."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    compact = "".join(text.split())
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(
            f"{where}: image_base64 is not valid base64: {exc}", code="invalid_base64"
        ) from exc
