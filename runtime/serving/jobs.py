"""Bulk captioning jobs in Redis: job state, item payloads, results and the stream of work.

A job is four keys under the stream's name (``jobs_stream``), all with the TTL ``jobs_result_ttl_s``
(from the job's creation, and again from its end), so job state survives any pod's restart:

- ``{stream}:job:{id}``: a hash of the job's state: status, total/done/failed, times, owner, options,
  webhook;
- ``{stream}:job:{id}:ids``: a list of the items' client ids (JSON: a string or ``null``), in order;
- ``{stream}:job:{id}:items``: a hash index -> payload (``u`` + URL, or ``d`` + the image bytes),
  deleted item by item once stored, and whole when the job is cancelled;
- ``{stream}:job:{id}:results``: a hash index -> the item's JSON line.

The stream ``{stream}`` holds one entry ``{job, index}`` per item, read by one consumer group
(:data:`captionfleet.names.JOBS_CONSUMER_GROUP`) on every replica (:mod:`job_worker`). Storing a
result and counting it is one Lua script: the result is written with ``HSETNX``, so an item
captioned twice (its consumer died after storing, before acknowledging) is recorded and counted once,
and the script that counts the last item moves the job to its final status exactly once.

That same script (or the cancel's) queues the job's webhook, in the same atomic step: one entry
``{job}`` in the stream ``{stream}:webhooks``, consumed by the same group (:mod:`webhook_queue`), so a
webhook is owed exactly once and is never lost with the replica that ended the job. The body it
sends is frozen in the job's hash on the first attempt (``webhook_body``), so every attempt, from any
replica, carries the same bytes and signature; ``webhook_attempts`` counts the attempts fleet-wide.

Nothing here knows HTTP: the server parses requests into :class:`JobSubmission` and renders what the
store returns.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from captionfleet.names import JOBS_CONSUMER_GROUP
from captionfleet.runtime.serving.errors import JobNotFound, JobsUnavailable
from captionfleet.runtime.serving.sources import ImageSource

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_FIRST_S = 0.1
RETRY_MOST_S = 2.0
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RESULT_CHUNK = 500
"""Results read from Redis per round trip when a job's results are listed."""


@dataclass(frozen=True)
class JobItem:
    """One image of a job, with the client's id for it."""

    source: ImageSource
    id: str | None = None


def _payload(source: ImageSource) -> bytes:
    """The item's value in the job's items hash (module doc); :func:`_source` reads it back."""
    if source.url is not None:
        return b"u" + source.url.encode()
    assert source.data is not None
    return b"d" + source.data


def _source(payload: bytes) -> ImageSource:
    if payload[:1] == b"u":
        return ImageSource(url=payload[1:].decode())
    return ImageSource(data=payload[1:])


@dataclass(frozen=True)
class JobSubmission:
    items: Sequence[JobItem]
    options: dict[str, Any] = field(default_factory=dict)
    """The option fields as the client gave them (validated by the caller)."""
    owner: str = "anonymous"
    webhook: str | None = None
    webhook_secret: str | None = None


@dataclass(frozen=True)
class JobStatus:
    id: str
    status: str
    total: int
    done: int
    failed: int
    created_at: str
    finished_at: str | None
    webhook: str | None = None
    webhook_secret: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The job's public state: ``GET /v1/jobs/{id}``'s body, and the webhook's."""
        return {
            "id": self.id,
            "status": self.status,
            "counts": {"total": self.total, "done": self.done, "failed": self.failed},
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }

    @classmethod
    def of(cls, job_id: str, fields: dict[bytes, bytes]) -> JobStatus:
        text = {k.decode(): v.decode() for k, v in fields.items() if k not in (b"options", b"webhook_body")}
        return cls(
            id=job_id,
            status=text["status"],
            total=int(text["total"]),
            done=int(text.get("done", 0)),
            failed=int(text.get("failed", 0)),
            created_at=text["created_at"],
            finished_at=text.get("finished_at") or None,
            webhook=text.get("webhook") or None,
            webhook_secret=text.get("webhook_secret") or None,
        )


@dataclass(frozen=True)
class StartedItem:
    """What a consumer needs to caption one item (from :meth:`JobStore.begin_item`)."""

    job_id: str
    index: int
    item_id: str | None
    options: dict[str, Any]
    source: ImageSource


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# KEYS: job, results, items, ids, webhooks. ARGV: index, line, failed (0/1), now, ttl seconds, job id.
# Returns {1 when this call ended the job, the job's status} ({0, ""} for a job that expired).
_RECORD = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return {0, status} end
local left = redis.call('PTTL', KEYS[1])
if left > 0 then redis.call('PEXPIRE', KEYS[2], left) end
redis.call('HINCRBY', KEYS[1], ARGV[3] == '1' and 'failed' or 'done', 1)
redis.call('HDEL', KEYS[3], ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local failed = tonumber(redis.call('HGET', KEYS[1], 'failed'))
local done = tonumber(redis.call('HGET', KEYS[1], 'done'))
if done + failed >= total and (status == 'queued' or status == 'running') then
  local final = 'succeeded'
  if failed >= total then final = 'failed' end
  redis.call('HSET', KEYS[1], 'status', final, 'finished_at', ARGV[4])
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
  local hook = redis.call('HGET', KEYS[1], 'webhook')
  if hook and hook ~= '' then redis.call('XADD', KEYS[5], '*', 'job', ARGV[6]) end
  return {1, final}
end
return {0, status}
"""

# KEYS: job, results, items, ids. ARGV: index. Returns {status, options, item id, payload}; payload
# false when there is nothing to do (job gone, ended or cancelled, item stored already).
_BEGIN = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'', '', '', false} end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running')
  status = 'running'
end
local options = redis.call('HGET', KEYS[1], 'options') or '{}'
local item_id = redis.call('LINDEX', KEYS[4], tonumber(ARGV[1])) or 'null'
if status ~= 'running' or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {status, options, item_id, false}
end
return {status, options, item_id, redis.call('HGET', KEYS[3], ARGV[1])}
"""

# KEYS: job, items, webhooks. ARGV: now, job id. Returns the status before (false for a job that is gone).
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('DEL', KEYS[2])
  local hook = redis.call('HGET', KEYS[1], 'webhook')
  if hook and hook ~= '' then redis.call('XADD', KEYS[3], '*', 'job', ARGV[2]) end
end
return status
"""

# KEYS: job. ARGV: the body to freeze unless one is already. Returns {body, attempt number}, or false
# for a job that is gone (expired).
_WEBHOOK_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'webhook_body', ARGV[1])
local attempt = redis.call('HINCRBY', KEYS[1], 'webhook_attempts', 1)
return {redis.call('HGET', KEYS[1], 'webhook_body'), attempt}
"""


@dataclass(frozen=True)
class WebhookAttempt:
    """One attempt at a job's webhook: where, signed with what, the frozen body, and which attempt
    this is (counted over the fleet, from 1)."""

    url: str
    secret: str | None
    body: bytes
    number: int


class JobStore:
    """The jobs' Redis keys, and the atomic steps on them. Redis errors become :class:`JobsUnavailable`
    for the API's callers; the consumer catches :class:`RedisError` itself and retries."""

    def __init__(self, url: str, stream: str, ttl_s: float, *, timeout_s: float = 5.0) -> None:
        self.stream = stream
        self.group = JOBS_CONSUMER_GROUP
        self.ttl_s = ttl_s
        # A few quick retries on a dropped connection: a Redis that restarts or fails over is back
        # within them more often than not, and every step here may be repeated safely.
        self.client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._record = self.client.register_script(_RECORD)
        self._begin = self.client.register_script(_BEGIN)
        self._cancel = self.client.register_script(_CANCEL)
        self._webhook_attempt = self.client.register_script(_WEBHOOK_ATTEMPT)

    @property
    def webhook_stream(self) -> str:
        """The stream of webhooks owed (one entry per ended job that has a webhook)."""
        return f"{self.stream}:webhooks"

    def keys(self, job_id: str) -> tuple[str, str, str, str]:
        """The job's hash, results, item payloads and item ids."""
        base = f"{self.stream}:job:{job_id}"
        return base, f"{base}:results", f"{base}:items", f"{base}:ids"

    async def close(self) -> None:
        await self.client.aclose()

    async def create(self, submission: JobSubmission) -> JobStatus:
        """Write a job and queue its items, all or nothing (one MULTI/EXEC)."""
        job_id = uuid.uuid4().hex
        job, _, items, ids = self.keys(job_id)
        created = now_iso()
        state = {
            "status": "queued",
            "total": len(submission.items),
            "done": 0,
            "failed": 0,
            "created_at": created,
            "owner": submission.owner,
            "options": json.dumps(submission.options),
            "webhook": submission.webhook or "",
            "webhook_secret": submission.webhook_secret or "",
        }
        ttl = max(1, int(self.ttl_s))
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(job, mapping=state)  # type: ignore[arg-type]
                pipe.rpush(ids, *(json.dumps(item.id) for item in submission.items))
                pipe.hset(
                    items, mapping={str(i): _payload(item.source) for i, item in enumerate(submission.items)}
                )
                for key in (job, ids, items):
                    pipe.expire(key, ttl)
                for index in range(len(submission.items)):
                    pipe.xadd(self.stream, {"job": job_id, "index": index})
                await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return JobStatus(job_id, "queued", len(submission.items), 0, 0, created, None)

    async def status(self, job_id: str, owner: str | None) -> JobStatus:
        """The job's state; :class:`JobNotFound` when it does not exist, expired or is another key's
        (``owner=None``: whoever's it is, for the consumers)."""
        if not _plausible_id(job_id):
            raise JobNotFound(f"no job {job_id!r}")
        try:
            fields: dict[bytes, bytes] = await self.client.hgetall(self.keys(job_id)[0])  # type: ignore[assignment]
        except RedisError as exc:
            raise _unavailable(exc) from exc
        if not fields or (owner is not None and fields.get(b"owner", b"").decode() != owner):
            raise JobNotFound(f"no job {job_id!r}")  # another key's job is nobody's business: 404 too
        return JobStatus.of(job_id, fields)

    async def cancel(self, job_id: str, owner: str) -> JobStatus:
        """Cancel the items not started yet (and queue the job's webhook if this ended it)."""
        await self.status(job_id, owner)
        job, _, items, _ = self.keys(job_id)
        try:
            await self._cancel(keys=[job, items, self.webhook_stream], args=[now_iso(), job_id])
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return await self.status(job_id, owner)

    async def results(self, job_id: str, owner: str) -> AsyncIterator[bytes]:
        """The job's result lines in input order (items not finished yet are left out; those a cancel
        stopped get a ``cancelled`` error)."""
        status = await self.status(job_id, owner)
        _, results, _, ids = self.keys(job_id)
        for start in range(0, status.total, RESULT_CHUNK):
            indexes = range(start, min(status.total, start + RESULT_CHUNK))
            try:
                lines: list[bytes | None] = await self.client.hmget(results, [str(i) for i in indexes])  # type: ignore[assignment]
                item_ids = await self.client.lrange(ids, indexes[0], indexes[-1])
            except RedisError as exc:
                raise _unavailable(exc) from exc
            for index, line, item_id in zip(indexes, lines, item_ids, strict=False):
                if line is not None:
                    yield line
                elif status.status == "cancelled":
                    yield _line(
                        index, json.loads(item_id), error=("cancelled", "the job was cancelled first")
                    )

    async def begin_item(self, job_id: str, index: int) -> StartedItem | None:
        """Mark the job running and load the item; ``None`` when there is nothing to do for it."""
        job, results, items, ids = self.keys(job_id)
        _, options, item_id, payload = await self._begin(keys=[job, results, items, ids], args=[index])
        if not payload:
            return None
        return StartedItem(job_id, index, json.loads(item_id), json.loads(options), _source(payload))

    async def record(
        self, item: StartedItem, *, result: dict[str, Any] | None, error: tuple[str, str] | None
    ) -> str | None:
        """Store one item's result line (once, whatever the retries); the job's final status when this
        call ended it, else ``None``."""
        line = _line(item.index, item.item_id, result=result, error=error)
        ended, status = await self._record(
            keys=[*self.keys(item.job_id), self.webhook_stream],
            args=[
                item.index,
                line,
                1 if error is not None else 0,
                now_iso(),
                max(1, int(self.ttl_s)),
                item.job_id,
            ],
        )
        return status.decode() if ended else None

    async def webhook_attempt(self, job_id: str) -> WebhookAttempt | None:
        """Count one more attempt at the job's webhook and return it; ``None`` when the job is gone
        (expired) or has no webhook."""
        try:
            status = await self.status(job_id, owner=None)
        except JobNotFound:
            return None
        if not status.webhook:
            return None
        body = json.dumps(status.as_dict()).encode()
        frozen = await self._webhook_attempt(keys=[self.keys(job_id)[0]], args=[body])
        if not frozen:
            return None
        return WebhookAttempt(status.webhook, status.webhook_secret, frozen[0], int(frozen[1]))

    async def ensure_group(self, stream: str) -> None:
        """The stream and its consumer group (created once; after a Redis that lost them, again)."""
        try:
            await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except RedisError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def pending_items(self) -> int:
        """Items not yet stored (acknowledged entries are deleted from the stream)."""
        return int(await self.client.xlen(self.stream))


async def retrying(step: Callable[[], Awaitable[T]]) -> T:
    """Run a Redis step until it works: Redis restarts are waited out with backoff (the caller's
    cancellation, e.g. the drain's grace, bounds the wait)."""
    pause = RETRY_FIRST_S
    while True:
        try:
            return await step()
        except (RedisError, OSError, JobsUnavailable) as exc:
            log.warning("the job store does not answer (%r); retrying in %.1f s", exc, pause)
            await asyncio.sleep(pause)
            pause = min(RETRY_MOST_S, pause * 2)


def _line(
    index: int,
    item_id: str | None,
    *,
    result: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
) -> bytes:
    body: dict[str, Any] = {"index": index, "id": item_id}
    if error is not None:
        body["error"] = {"code": error[0], "message": error[1]}
    else:
        body["result"] = result
    return json.dumps(body).encode() + b"\n"


def _plausible_id(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and all(c in "0123456789abcdef" for c in job_id)


def _unavailable(exc: RedisError) -> JobsUnavailable:
    return JobsUnavailable(f"the job store (Redis) did not answer: {exc}", retry_after=2.0)
