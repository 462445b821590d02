"""The job API's routes: ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``.../results``, ``DELETE``.

Thin handlers over the job store (:mod:`captionfleet.runtime.serving.jobs`): admit (readiness, key,
rate), parse the submission within its limits, and render what the store returns. A job belongs to
the API key that made it; to any other key it does not exist (404, as for a job that expired).

A submission is JSON ``{"items": [{"id"?, "url" | "image_base64"}, ...], "options"?: {...},
"webhook"?: url, "webhook_secret"?: str}`` or ``multipart/form-data`` with one ``images`` field per
image (its filename is the item's id), option fields and ``webhook``/``webhook_secret`` fields. The
whole body is bounded by ``jobs_max_bytes`` (413), the items by ``jobs_max_items`` (400). Item URLs
are fetched when their item is captioned, through the same SSRF guard as ``/v1/caption``, so a
refused URL is that item's error; the webhook's URL is checked on submission too.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from captionfleet.runtime.server.fetch import absolute_url, check_url
from captionfleet.runtime.server.state import STATE, ServerState, admit
from captionfleet.runtime.serving.errors import JobsUnavailable
from captionfleet.runtime.serving.jobs import JobItem, JobStore, JobSubmission
from captionfleet.runtime.serving.sources import ImageSource
from captionfleet.runtime.web.body import BodyAllowance, read_all
from captionfleet.runtime.web.context import BODY, head_sent
from captionfleet.runtime.web.errors import InvalidRequest
from captionfleet.runtime.web.parsing import (
    OPTION_FIELDS,
    BodySource,
    decoded_source,
    is_text,
    json_object,
    json_source,
    multipart_parts,
    query_fields,
    text_field,
)
from captionfleet.runtime.web.protocol import defer_continue

SUBMISSION_FIELDS = ("items", "options", "webhook", "webhook_secret")
ITEM_FIELDS = ("id", "url", "image_base64")
MAX_ITEM_ID_CHARS = 256


def _store(request: web.Request) -> tuple[ServerState, JobStore, str]:
    state = request.app[STATE]
    _, owner = admit(request, state)
    if state.jobs is None:
        raise JobsUnavailable("this server has no job API (start it with --jobs-redis-url)", retry_after=60.0)
    return state, state.jobs, owner


async def create_job(request: web.Request) -> web.Response:
    state, store, owner = _store(request)
    assert state.service is not None  # admitted: the model is loaded
    submission = await _parse_submission(request, state, owner)
    state.service.resolve_options(submission.options)  # bad options: 400 now, not per item later
    status = await store.create(submission)
    return web.json_response(status.as_dict(), status=202, headers={"Location": f"/v1/jobs/{status.id}"})


async def job_status(request: web.Request) -> web.Response:
    _, store, owner = _store(request)
    status = await store.status(request.match_info["job_id"], owner)
    return web.json_response(status.as_dict())


async def job_results(request: web.Request) -> web.StreamResponse:
    _, store, owner = _store(request)
    lines = store.results(request.match_info["job_id"], owner)
    first = await anext(lines, None)  # a job that is not there is a 404 before any byte is sent
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    head_sent(request)  # a large job's results may take longer than the request's deadline to send
    if first is not None:
        await response.write(first)
        async for line in lines:
            await response.write(line)
    await response.write_eof()
    return response


async def cancel_job(request: web.Request) -> web.Response:
    _, store, owner = _store(request)
    status = await store.cancel(request.match_info["job_id"], owner)  # queues the webhook, if any
    return web.json_response(status.as_dict())


def add_job_routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", create_job, expect_handler=defer_continue)
    app.router.add_get("/v1/jobs/{job_id}", job_status)
    app.router.add_get("/v1/jobs/{job_id}/results", job_results)
    app.router.add_delete("/v1/jobs/{job_id}", cancel_job)


async def _parse_submission(request: web.Request, state: ServerState, owner: str) -> JobSubmission:
    settings = state.settings
    source, allowance = await decoded_source(request, request[BODY], settings.jobs_max_bytes)
    content_type = source.content_type.lower()
    if content_type == "multipart/form-data":
        submission = await _parse_multipart(
            source, allowance, settings.jobs_max_bytes, settings.jobs_max_items, settings.max_form_fields
        )
    elif content_type == "application/json" or content_type.endswith("+json"):
        body = await read_all(source.content, allowance, settings.jobs_max_bytes)
        submission = _parse_json(body, settings.jobs_max_items)
    else:
        raise InvalidRequest(
            'a job is JSON {"items": [{"url": ...} | {"image_base64": ...}, ...]} or multipart/form-data '
            "with one 'images' field per image",
            code="unsupported_body",
        )
    options = query_fields(request) | submission.options
    if submission.webhook is not None:
        check_url(absolute_url(submission.webhook, "the webhook"), settings.allow_private_urls)
    return JobSubmission(submission.items, options, owner, submission.webhook, submission.webhook_secret)


def _too_many(count: int, most: int) -> None:
    if count > most:
        raise InvalidRequest(f"more than {most} items in one job", code="too_many_items")


async def _parse_multipart(
    source: BodySource, allowance: BodyAllowance, limit: int, most: int, max_fields: int
) -> JobSubmission:
    items: list[JobItem] = []
    text: dict[str, str] = {}
    budget = limit
    async for part in multipart_parts(source, max_fields, ("images", "image")):
        name = part.name or ""
        if name in ("images", "image"):
            _too_many(len(items) + 1, most)
            data = await read_all(part, allowance, budget)
            budget -= len(data)
            where = f"the filename of image {len(items)}"
            items.append(JobItem(ImageSource(data=data), id=_item_id(part.filename or None, where)))
        elif name in (*OPTION_FIELDS, "webhook", "webhook_secret"):
            text[name] = await text_field(part, allowance)
        else:
            budget -= len(await read_all(part, allowance, budget))
    if not items:
        raise InvalidRequest("no images: send one multipart field 'images' per image", code="missing_image")
    options = {name: value for name, value in text.items() if name in OPTION_FIELDS}
    return JobSubmission(
        items, options, webhook=text.get("webhook"), webhook_secret=text.get("webhook_secret")
    )


def _parse_json(body: bytes, most: int) -> JobSubmission:
    document = json_object(body)
    _no_unknown(document, SUBMISSION_FIELDS, "the job")
    entries = document.get("items")
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest(
            '"items" must be a non-empty list of {"url"} or {"image_base64"} objects', code="missing_image"
        )
    _too_many(len(entries), most)
    options = document.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise InvalidRequest('"options" must be an object', code="invalid_field")
    _no_unknown(options, OPTION_FIELDS, '"options"')
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidRequest(f"option {name!r} must be a string or an integer", code="invalid_field")
    return JobSubmission(
        [_json_item(entry, f"items[{i}]") for i, entry in enumerate(entries)],
        {name: value for name, value in options.items() if value is not None},
        webhook=_optional_text(document, "webhook"),
        webhook_secret=_optional_text(document, "webhook_secret"),
    )


def _no_unknown(document: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) in {where}: {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}",
            code="unknown_field",
        )


def _optional_text(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{name!r} must be a string", code="invalid_field")
    return value


def _json_item(entry: object, where: str) -> JobItem:
    source = json_source(entry, where)  # an object with one of url and image_base64
    assert isinstance(entry, dict)
    _no_unknown(entry, ITEM_FIELDS, where)
    return JobItem(source, id=_item_id(entry.get("id"), f"{where}.id"))


def _item_id(value: object, where: str) -> str | None:
    """An item's id (JSON ``id``, or a multipart image's filename): text of at most 256 characters.

    A filename that is not UTF-8 arrives with its bytes escaped as lone surrogates: no text either."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_ITEM_ID_CHARS and is_text(value):
        return value
    raise InvalidRequest(
        f"{where} must be UTF-8 text of at most {MAX_ITEM_ID_CHARS} characters", code="invalid_field"
    )
