"""One run of ``captionfleet caption``: direct calls or jobs, the progress bar, the state, the output.

The output is written once every image has an answer, to ``<output>.part`` first and then renamed,
so a file named ``output`` is always complete: one line per image, in input order, with its index in
the whole run. Jobs are cut from the images in order (``max_job_items``, ``max_job_bytes``), the same
way on every run, and the state file records each job's id as soon as it is accepted: a run started
again with the same images and output waits for those jobs instead of submitting them again, and
submits only what was never accepted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
from tqdm import tqdm

from captionfleet.client.api import Api, ApiError
from captionfleet.client.inputs import Item, fingerprint
from captionfleet.client.settings import CaptionSettings

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    jobs: list[str] = field(default_factory=list)


@dataclass
class Job:
    """A job of the run: its images are those from ``first`` on, ``count`` of them."""

    first: int
    count: int
    id: str = ""
    status: str = "queued"
    finished: int = 0  # done + failed, as the server counts them


def _line(index: int, item_id: str | None, outcome: dict[str, Any], key: str) -> dict[str, Any]:
    return {"index": index, "id": item_id, key: outcome}


def error_line(index: int, item_id: str | None, code: str, message: str) -> dict[str, Any]:
    return _line(index, item_id, {"code": code, "message": message}, "error")


async def caption_directly(
    api: Api, settings: CaptionSettings, items: Sequence[Item]
) -> list[dict[str, Any]]:
    """Each image by ``POST /v1/caption``, ``concurrency`` at once; an image's error is its line."""
    gate = asyncio.Semaphore(settings.concurrency)
    bar = tqdm(total=len(items), unit="image", disable=not settings.progress)

    async def one(index: int, item: Item) -> dict[str, Any]:
        async with gate:
            try:
                if item.url is not None:
                    result = await api.json(
                        "POST", "/v1/caption", json={"url": item.url, **settings.options()}
                    )
                else:
                    assert item.path is not None
                    kind = mimetypes.guess_type(item.path.name)[0] or "image/jpeg"
                    result = await api.json(
                        "POST", "/v1/caption", data=item.path.read_bytes(), params=_query(settings),
                        headers={"Content-Type": kind if kind.startswith("image/") else "image/jpeg"},
                    )  # fmt: skip
                line = _line(index, item.id, result, "result")
            except ApiError as exc:
                line = error_line(index, item.id, exc.code, exc.message)
            bar.update(1)
            return line

    try:
        return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
    finally:
        bar.close()


def _query(settings: CaptionSettings) -> dict[str, str]:
    return {name: str(value) for name, value in settings.options().items()}


def plan(items: Sequence[Item], settings: CaptionSettings) -> tuple[list[Job], dict[int, dict[str, Any]]]:
    """The run's jobs, cut in order; and the lines of images too large for any job."""
    jobs: list[Job] = []
    refused: dict[int, dict[str, Any]] = {}
    size = 0
    for index, item in enumerate(items):
        weight = item.payload_bytes()
        if weight > settings.max_job_bytes:
            message = f"{weight} bytes encoded; a job may hold {settings.max_job_bytes} (max_job_bytes)"
            refused[index] = error_line(index, item.id, "payload_too_large", message)
            continue
        last = jobs[-1] if jobs else None
        contiguous = last is not None and last.first + last.count == index  # a job's images are a range
        if (
            not contiguous
            or last is None
            or last.count >= settings.max_job_items
            or (size + weight > settings.max_job_bytes)
        ):
            jobs.append(Job(first=index, count=0))
            size = 0
        jobs[-1].count = index - jobs[-1].first + 1
        size += weight
    return jobs, refused


def job_body(items: Sequence[Item], job: Job, settings: CaptionSettings) -> dict[str, Any]:
    """The job's JSON: its images (files base64-encoded), with their ids and the options."""
    entries = []
    for item in items[job.first : job.first + job.count]:
        if item.url is not None:
            entries.append({"id": item.id, "url": item.url})
        else:
            assert item.path is not None
            entries.append({"id": item.id, "image_base64": base64.b64encode(item.path.read_bytes()).decode()})
    return {"items": entries, "options": settings.options()}


class State:
    """``<output>.state.json``: which jobs of this run were accepted, for the run that resumes it."""

    def __init__(self, output: Path, endpoint: str, inputs: str) -> None:
        self.path = output.with_name(output.name + ".state.json")
        self.endpoint = endpoint
        self.inputs = inputs

    def load(self, jobs: list[Job]) -> None:
        """The ids of the jobs a previous run had submitted, if it was this run (else ValueError)."""
        if not self.path.exists():
            return
        saved = json.loads(self.path.read_text())
        if saved.get("inputs") != self.inputs or saved.get("endpoint") != self.endpoint:
            raise ValueError(
                f"{self.path} belongs to a run with other images or another endpoint: remove it, or "
                "choose another --output"
            )
        accepted = {(j["first"], j["count"]): j["id"] for j in saved.get("jobs", [])}
        for job in jobs:
            job.id = accepted.get((job.first, job.count), "")

    def save(self, jobs: Sequence[Job]) -> None:
        record: dict[str, Any] = {"endpoint": self.endpoint, "inputs": self.inputs}
        record["jobs"] = [{"first": j.first, "count": j.count, "id": j.id} for j in jobs if j.id]
        part = self.path.with_name(self.path.name + ".part")
        part.write_text(json.dumps(record))
        part.replace(self.path)  # never a half-written state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


async def submit(
    api: Api, items: Sequence[Item], jobs: Sequence[Job], settings: CaptionSettings, state: State
) -> None:
    """Every job not accepted before; each id saved as soon as the server gives it."""
    for job in jobs:
        if job.id:
            continue
        accepted = await api.json("POST", "/v1/jobs", once=True, json=job_body(items, job, settings))
        job.id = str(accepted["id"])
        state.save(jobs)


async def wait(api: Api, jobs: Sequence[Job], settings: CaptionSettings, total: int) -> None:
    """Poll until every job has ended, the bar showing the images answered."""
    bar = tqdm(total=total, unit="image", disable=not settings.progress)
    try:
        while True:
            for job in jobs:
                if job.status not in TERMINAL:
                    status = await api.json("GET", f"/v1/jobs/{quote(job.id, safe='')}")
                    counts = status.get("counts") or {}
                    job.status = str(status.get("status"))
                    job.finished = int(counts.get("done", 0)) + int(counts.get("failed", 0))
            bar.n = sum(job.finished for job in jobs)
            bar.refresh()
            if all(job.status in TERMINAL for job in jobs):
                return
            await asyncio.sleep(settings.poll_interval_s)  # the polling interval, not synchronisation
    finally:
        bar.close()


async def write_jobs(
    api: Api, jobs: Sequence[Job], refused: dict[int, dict[str, Any]], ids: Sequence[str | None], out: TextIO
) -> Summary:
    """Every image's line in input order (``ids``: the image ids, one per image of the run): the
    jobs' results, re-indexed in the whole run, and a line for any image a job left without one."""
    summary = Summary(jobs=[job.id for job in jobs])
    index = 0
    for job in [*jobs, Job(first=len(ids), count=0)]:  # a sentinel flushes the refused images at the end
        while index < job.first:
            line = refused.get(index) or error_line(index, ids[index], "missing", "in no job")
            summary.failed += _write(out, line)
            index += 1
        if not job.count:
            continue
        async for raw in api.lines(f"/v1/jobs/{quote(job.id, safe='')}/results"):
            line = json.loads(raw)
            position = int(line["index"])
            if not 0 <= position < job.count or job.first + position != index:
                continue  # out of order or repeated: the missing ones get their line below
            line["index"] = index
            failed = _write(out, line)
            summary.failed += failed
            summary.done += 1 - failed
            index += 1
        while index < job.first + job.count:
            message = f"job {job.id} ended {job.status} without a result for it"
            summary.failed += _write(out, error_line(index, ids[index], "missing", message))
            index += 1
    return summary


def _write(out: TextIO, line: dict[str, Any]) -> int:
    """Writes the line; 1 when it is an error."""
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return int("error" in line)


async def _written(output: Path, produce: Callable[[TextIO], Awaitable[Summary]]) -> Summary:
    """``produce`` writes the lines to ``<output>.part``, renamed to ``output`` once complete."""
    part = output.with_name(output.name + ".part")
    with part.open("w", encoding="utf-8") as out:
        summary = await produce(out)
    part.replace(output)
    return summary


async def run(settings: CaptionSettings, items: Sequence[Item]) -> Summary:
    """Caption ``items`` (or fetch the job ``settings.resume``) into ``settings.output``."""
    output = Path(settings.output)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.concurrency + 2)
    ) as session:
        api = Api(session, settings)
        if settings.resume:
            status = await api.json("GET", f"/v1/jobs/{quote(settings.resume, safe='')}")
            total = int((status.get("counts") or {}).get("total", 0))
            jobs = [Job(0, total, id=settings.resume)]
            await wait(api, jobs, settings, total)
            return await _written(output, lambda out: write_jobs(api, jobs, {}, [None] * total, out))
        if len(items) <= settings.direct_max_images:
            lines = await caption_directly(api, settings, items)
            return await _written(output, lambda out: _write_all(out, lines))
        jobs, refused = plan(items, settings)
        state = State(output, settings.endpoint, fingerprint(items))
        state.load(jobs)
        await submit(api, items, jobs, settings, state)
        await wait(api, jobs, settings, len(items))
        ids = [item.id for item in items]
        summary = await _written(output, lambda out: write_jobs(api, jobs, refused, ids, out))
        state.remove()
        return summary


async def _write_all(out: TextIO, lines: Sequence[dict[str, Any]]) -> Summary:
    summary = Summary()
    for line in lines:
        failed = _write(out, line)
        summary.failed += failed
        summary.done += 1 - failed
    return summary
