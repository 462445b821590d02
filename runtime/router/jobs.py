"""The job API through the router: ``POST /v1/jobs`` picks a version, the job's id leads back to it.

Which version takes a job
-------------------------
The same table and weights as captions, sticky by ``X-User-Id``, else by the API key (so one client's
jobs go to one version while the table stays put), else weighted at random.

Which version a job id names
----------------------------
A job lives in the Redis store of the version that took it (each version has its own stream and
keys, so that its own model captions it), so its later ``GET``/``DELETE`` must reach that version,
whatever its weight now. The router names the version in the id it gives out: ``<version>.<the
runtime's id>`` (``v2.3f9c...``). The id is the whole state, so any router pod, and a router that
restarted, finds the version again, with nothing stored in the router. The ``id`` of the job's JSON
(the 202, the status, the cancel) and the ``Location`` header carry this id; the runtime is sent its
own. An id that names no version of the table is a 404 ``job_not_found``, as the runtime answers for
a job it does not have; a version without ready pods is a 503 with ``Retry-After``. Version names are
DNS labels (the CRD's rule), so they hold no ``.``; the longest version name that prefixes the id
wins, so a routes file's dotted names work too.

Results stream
--------------
``GET /v1/jobs/{id}/results`` is relayed as it arrives (JSON Lines of any length, never held whole):
its status and headers within the request's deadline, then each chunk within ``request_timeout_ms``
of the one before. A runtime that fails mid-way leaves the answer cut short (the connection is
closed without the chunked end), never a complete-looking file that lacks lines.

A submission is sent again only when the runtime cannot have taken it (a 503, or a connection that was
never made), never after a connection dropped once it was sent: a job is never created twice. Every
job call is bulk work: counted in the version's ``bulk`` figures only (``stats.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from captionfleet.names import API_KEY_HEADER, REQUEST_ID_HEADER, ROUTED_VERSION_HEADER, USER_ID_HEADER
from captionfleet.runtime.router.errors import BadUpstreamResponse, NoRoute, UnknownJob
from captionfleet.runtime.router.proxy import CHUNK, Outgoing, UpstreamAnswer, relayed_headers
from captionfleet.runtime.router.relay import checked_body, with_retry_after
from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.runtime.web.context import REQUEST_ID, head_sent
from captionfleet.runtime.web.errors import EdgeError
from captionfleet.runtime.web.protocol import defer_continue

if TYPE_CHECKING:  # the app builds these routes: no import of it at run time
    from captionfleet.runtime.router.app import Replier, Router

log = logging.getLogger(__name__)

SEPARATOR = "."
JOBS_PATH = "/v1/jobs"


def public_id(version: str, job_id: str) -> str:
    """The id the router gives out for the runtime's ``job_id`` on ``version``."""
    return f"{version}{SEPARATOR}{job_id}"


def locate(table: RoutingTable, job: str) -> tuple[Version, str]:
    """The version a job id names and the runtime's own id; UnknownJob (404) when it names none."""
    for version in sorted(table.versions, key=lambda v: len(v.name), reverse=True):
        prefix = version.name + SEPARATOR
        if job.startswith(prefix) and len(job) > len(prefix):
            return version, job[len(prefix) :]
    raise UnknownJob(f"no job {job[:100]!r}")


def sticky_key(request: web.Request) -> str | None:
    """What keeps a client's jobs on one version: its user id, else its API key (hashed into a
    bucket, never kept)."""
    for header in (USER_ID_HEADER, API_KEY_HEADER):
        value = request.headers.get(header, "").strip()
        if value:
            return value
    return None


def named(version: Version, *, required: bool) -> Callable[[UpstreamAnswer], UpstreamAnswer]:
    """A rewrite of a runtime's job answer: its ``id`` and ``Location`` carry the router's id.

    With ``required`` (the 202 of a new job), a success without a job id is a bad answer (502): the
    client could never find its job."""

    def rewrite(answer: UpstreamAnswer) -> UpstreamAnswer:
        if not 200 <= answer.status < 300:
            return answer  # the runtime's error, relayed as it is
        try:
            document: Any = json.loads(answer.body)
        except ValueError:
            document = None
        job_id = document.get("id") if isinstance(document, dict) else None
        if not isinstance(job_id, str) or not job_id:
            if required:
                raise BadUpstreamResponse("the runtime accepted the job but did not answer its id")
            return answer
        document["id"] = public_id(version.name, job_id)
        headers = answer.headers.copy()
        if headers.get("Location", "").startswith(JOBS_PATH + "/"):
            headers["Location"] = f"{JOBS_PATH}/{quote(document['id'], safe='')}"
        headers.popall("Content-Length", None)
        return UpstreamAnswer(answer.status, headers, json.dumps(document).encode(), answer.endpoint)

    return rewrite


class JobRoutes:
    """The handlers of the job API on one router."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(JOBS_PATH, self.create, expect_handler=defer_continue)
        app.router.add_get(JOBS_PATH + "/{job}", self.status)
        app.router.add_delete(JOBS_PATH + "/{job}", self.status)
        app.router.add_get(JOBS_PATH + "/{job}/results", self.results)

    async def create(self, request: web.Request) -> web.StreamResponse:
        router = self.router
        body, _ = await router.admit(request, router.settings.jobs_max_bytes, bulk=True)
        version = router.pick(request, sticky_key(request), bulk=True)
        reply = router.sent_to(  # no job twice
            version, lambda ready: router.buffered(ready, named(ready, required=True), once=True)
        )
        return await router.route(request, version, body, request.rel_url.raw_path_qs, reply, True)

    async def status(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/jobs/{id}`` and ``DELETE /v1/jobs/{id}``, on the version the id names."""
        version, path = await self._reach(request, "")
        reply = self.router.buffered(version, named(version, required=False))
        return await self.router.route(request, version, b"", path, reply, True)

    async def results(self, request: web.Request) -> web.StreamResponse:
        version, path = await self._reach(request, "/results")
        return await self.router.route(request, version, b"", path, self._streamed(request, version), True)

    async def _reach(self, request: web.Request, suffix: str) -> tuple[Version, str]:
        """The key checked, the body (none expected) bounded, and the version and runtime path of the job."""
        router = self.router
        await router.admit(request, router.settings.max_body_bytes, bulk=True)
        try:
            version, job_id = locate(router.holder.table, request.match_info["job"])
            if not version.endpoints:
                raise NoRoute(f"version {version.name} of this job has no ready runtime now", retry_after=1.0)
        except EdgeError as exc:
            router.count_unrouted(exc, bulk=True)
            raise
        query = f"?{request.rel_url.raw_query_string}" if request.rel_url.raw_query_string else ""
        return version, f"{JOBS_PATH}/{quote(job_id, safe='')}{suffix}{query}"

    def _streamed(self, request: web.Request, version: Version) -> Replier:
        forwarder = self.router.forwarder
        idle_s = self.router.settings.request_timeout_ms / 1000

        async def reply(outgoing: Outgoing, on_retry: Callable[[str], None]) -> web.StreamResponse:
            async with forwarder.stream(version, outgoing, idle_s, on_retry) as upstream:
                if upstream.status != 200:  # an error (or anything but the stream): small, relayed whole
                    content = await forwarder.read_answer(upstream, str(upstream.url))
                    content = checked_body(upstream.status, content, outgoing.request_id, outgoing.method)
                    response = web.Response(
                        status=upstream.status,
                        body=content,
                        headers=with_retry_after(upstream.status, relayed_headers(upstream.headers.items())),
                    )
                    response.headers[ROUTED_VERSION_HEADER] = version.name
                    return response
                return await _relay(request, upstream, version)

        return reply


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, version: Version
) -> web.StreamResponse:
    """The runtime's streamed answer, chunk by chunk as it comes."""
    response = web.StreamResponse(status=upstream.status, headers=relayed_headers(upstream.headers.items()))
    response.headers[ROUTED_VERSION_HEADER] = version.name
    response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]  # the edge sets it too late for a stream
    await response.prepare(request)
    head_sent(request)
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            try:
                await response.write(chunk)
            except ConnectionError:  # the client went away: nobody to tell
                log.info("job results: the client left before their end", extra={"version": version.name})
                return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning(
            "job results cut short by the runtime", extra={"version": version.name, "error": repr(exc)}
        )
        response.force_close()
        if request.transport is not None:
            request.transport.close()  # no chunked end: the client sees the answer is incomplete
        return response
    await response.write_eof()
    return response
