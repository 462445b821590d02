"""``captionfleet caption``, the client for many images, run as the command it is.

A handful of images go to a real ``captionfleet serve`` by ``POST /v1/caption``. Jobs go to a small
aiohttp server in this file that speaks the contract's job API (a test double of the external API the
client calls), so that splitting, progress, resuming after an interruption and the output's order
can be driven and counted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from captionfleet.cli import main
from captionfleet.runtime.server.testing import encode, shapes_image


def images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"img-{index:03d}.png"
        path.write_bytes(encode(shapes_image(index, size=48)))
        paths.append(path)
    return paths


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def caption_command(*argv: str, progress: bool = False) -> int:
    """The CLI in a thread (it runs its own event loop), while this test's loop serves."""
    return await asyncio.to_thread(main, ["caption", "--progress", str(progress).lower(), *argv])


async def test_a_handful_of_images_are_captioned_directly_by_a_real_server(
    start_server: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server = await start_server()
    paths = images(tmp_path / "photos", 3)
    output = tmp_path / "out.jsonl"
    private = "http://127.0.0.1:9/private.png"  # the server's SSRF guard refuses it: that image's error
    code = await caption_command(
        "--endpoint", server.url, "--output", str(output), str(tmp_path / "photos"), private
    )
    assert code == 1  # one image failed
    lines = read_lines(output)
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert [line["id"] for line in lines] == [*map(str, paths), private]
    for path, line in zip(paths, lines, strict=False):
        async with http.post(server.url + "/v1/caption", data=path.read_bytes(),
                             headers={"Content-Type": "image/png"}) as response:  # fmt: skip
            assert line["result"]["caption"] == (await response.json())["caption"]
    assert lines[3]["error"]["code"] == "url_refused" and "result" not in lines[3]
    assert not (tmp_path / "out.jsonl.state.json").exists()


@dataclass
class JobApi:
    """The contract's job API, with scripted progress: each status poll finishes ``step`` more items."""

    step: int = 4
    hold: bool = False  # jobs make no progress while set
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    submissions: list[dict[str, Any]] = field(default_factory=list)
    create_statuses: list[int] = field(default_factory=list)  # answered in turn (created or not), then 202
    url: str = ""

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert request.headers["X-Priority"] == "bulk" and request.headers.get("X-API-Key") == "k-1"
        self.submissions.append(body)
        if self.create_statuses:
            error = {"error": {"code": "scripted", "message": "scripted"}, "request_id": "r"}
            return web.json_response(error, status=self.create_statuses.pop(0), headers={"Retry-After": "0"})
        job_id = f"v1.{len(self.jobs):04d}"
        self.jobs[job_id] = {"items": body["items"], "done": 0, "options": body["options"]}
        return web.json_response(
            {"id": job_id, "status": "queued", "counts": self._counts(job_id)}, status=202
        )

    def _counts(self, job_id: str) -> dict[str, int]:
        job = self.jobs[job_id]
        failed = sum(1 for item in job["items"][: job["done"]] if "bad" in item.get("url", ""))
        return {"total": len(job["items"]), "done": job["done"] - failed, "failed": failed}

    async def status(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        if job_id not in self.jobs:
            return web.json_response({"error": {"code": "job_not_found", "message": "no"}}, status=404)
        job = self.jobs[job_id]
        if not self.hold:
            job["done"] = min(len(job["items"]), job["done"] + self.step)
        finished = job["done"] == len(job["items"])
        body = {
            "id": job_id,
            "status": "succeeded" if finished else "running",
            "counts": self._counts(job_id),
        }
        return web.json_response(body)

    async def results(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs[request.match_info["job_id"]]
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for index, item in enumerate(job["items"]):
            if "bad" in item.get("url", ""):
                line: dict[str, Any] = {"error": {"code": "url_fetch_failed", "message": "404"}}
            else:
                data = base64.b64decode(item["image_base64"]) if "image_base64" in item else b""
                line = {"result": {"caption": f"caption of {item['id']}", "bytes": len(data)}}
            await response.write(json.dumps({"index": index, "id": item["id"], **line}).encode() + b"\n")
        await response.write_eof()
        return response


@pytest.fixture
async def job_api() -> AsyncIterator[JobApi]:
    api = JobApi()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/jobs", api.create)
    app.router.add_get("/v1/jobs/{job_id}", api.status)
    app.router.add_get("/v1/jobs/{job_id}/results", api.results)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    api.url = str(server.make_url("")).rstrip("/")
    yield api
    await server.close()


def job_args(api: JobApi, output: Path, *more: str) -> list[str]:
    return ["--endpoint", api.url, "--api-key", "k-1", "--output", str(output), "--direct-max-images", "4",
            "--poll-interval-s", "0.01", *more]  # fmt: skip


async def test_many_images_become_jobs_whose_results_are_written_in_input_order(
    job_api: JobApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = images(tmp_path / "a", 14) + images(tmp_path / "b", 9, start=14)
    urls = tmp_path / "urls.txt"
    urls.write_text("# catalogue\nhttps://img.example/1.jpg\n\nhttps://img.example/bad.jpg  # gone\n")
    output = tmp_path / "results.jsonl"
    argv = job_args(job_api, output, "--max-job-items", "10", "--style", "concise", str(tmp_path / "a"))
    code = await caption_command(*argv, str(urls), str(tmp_path / "b"), progress=True)
    assert code == 1  # the gone URL
    err = capsys.readouterr().err
    assert "25/25" in err and "image" in err  # the progress bar's last state
    assert "24 captioned, 1 failed" in err
    assert [len(s["items"]) for s in job_api.submissions] == [10, 10, 5]
    assert all(s["options"] == {"style": "concise"} for s in job_api.submissions)
    lines = read_lines(output)
    expected_ids = [*map(str, paths[:14]), "https://img.example/1.jpg", "https://img.example/bad.jpg",
                    *map(str, paths[14:])]  # fmt: skip
    assert [line["index"] for line in lines] == list(range(25))
    assert [line["id"] for line in lines] == expected_ids
    assert all(line["result"]["caption"] == f"caption of {line['id']}" for line in lines if "result" in line)
    assert [line["index"] for line in lines if "error" in line] == [15]
    assert lines[0]["result"]["bytes"] == paths[0].stat().st_size  # the file itself was sent
    assert not (tmp_path / "results.jsonl.state.json").exists()


async def test_an_interrupted_run_resumes_its_jobs_without_submitting_them_again(
    job_api: JobApi, tmp_path: Path
) -> None:
    images(tmp_path / "in", 12)
    output = tmp_path / "results.jsonl"
    state = tmp_path / "results.jsonl.state.json"
    job_api.hold = True  # the jobs wait: the run is interrupted while it polls
    argv = [
        "-m",
        "captionfleet",
        "caption",
        *job_args(job_api, output, "--max-job-items", "5"),
        str(tmp_path / "in"),
    ]
    process = await asyncio.create_subprocess_exec(sys.executable, *argv, stderr=asyncio.subprocess.PIPE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not (state.exists() and len(json.loads(state.read_text())["jobs"]) == 3):
        assert loop.time() < deadline and process.returncode is None, "the jobs were never all accepted"
        await asyncio.sleep(0.05)  # polling the state file with a deadline
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 130 and b"the same command resumes" in stderr
    assert not output.exists() and len(job_api.submissions) == 3

    job_api.hold = False
    code = await caption_command(*job_args(job_api, output, "--max-job-items", "5"), str(tmp_path / "in"))
    assert code == 0 and len(job_api.submissions) == 3  # waited for the same jobs
    assert [line["index"] for line in read_lines(output)] == list(range(12))
    assert not state.exists()


async def test_a_job_id_is_fetched_without_images_and_a_foreign_state_is_refused(
    job_api: JobApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images(tmp_path / "in", 6)
    first = tmp_path / "first.jsonl"
    assert await caption_command(*job_args(job_api, first), str(tmp_path / "in")) == 0
    job_id = next(iter(job_api.jobs))
    again = tmp_path / "again.jsonl"
    assert await caption_command(*job_args(job_api, again, "--resume", job_id)) == 0
    assert len(job_api.submissions) == 1 and read_lines(again) == read_lines(first)

    state = tmp_path / "first.jsonl.state.json"
    state.write_text(json.dumps({"endpoint": job_api.url, "inputs": "other images", "jobs": []}))
    assert await caption_command(*job_args(job_api, first), str(tmp_path / "in")) == 2
    assert "belongs to a run with other images" in capsys.readouterr().err


async def test_bad_arguments_are_refused_before_anything_is_sent(
    job_api: JobApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("https://img.example/1.jpg\nftp://img.example/2.jpg\n")
    output = tmp_path / "out.jsonl"
    assert await caption_command(*job_args(job_api, output), str(urls)) == 2
    assert (
        "urls.txt:2: 'ftp://img.example/2.jpg' is not an http:// or https:// URL" in capsys.readouterr().err
    )
    assert await caption_command(*job_args(job_api, output), str(tmp_path / "nothing-here")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert await caption_command("--endpoint", job_api.url, "--output", str(output)) == 2
    assert "give images" in capsys.readouterr().err
    assert job_api.submissions == [] and not output.exists()


async def test_an_image_too_large_for_any_job_gets_its_own_error_line(
    job_api: JobApi, tmp_path: Path
) -> None:
    paths = images(tmp_path / "in", 6)
    big = paths[2]
    big.write_bytes(os.urandom(8000))  # 4 * 8000 / 3 encoded: over max_job_bytes below
    output = tmp_path / "out.jsonl"
    code = await caption_command(*job_args(job_api, output, "--max-job-bytes", "6000"), str(tmp_path / "in"))
    assert code == 1
    lines = read_lines(output)
    assert [line["index"] for line in lines] == list(range(6))
    assert lines[2]["error"]["code"] == "payload_too_large" and lines[2]["id"] == str(big)
    assert sum(len(s["items"]) for s in job_api.submissions) == 5


async def test_a_submission_is_retried_only_when_the_server_cannot_have_taken_it(
    job_api: JobApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images(tmp_path / "in", 6)
    output = tmp_path / "out.jsonl"
    job_api.create_statuses = [503]  # refused before any work: sent again
    assert await caption_command(*job_args(job_api, output), str(tmp_path / "in")) == 0
    assert len(job_api.submissions) == 2 and len(job_api.jobs) == 1
    job_api.create_statuses = [504]  # the job may exist: never sent twice, the run stops
    output.unlink()
    assert await caption_command(*job_args(job_api, output), str(tmp_path / "in")) == 2
    assert len(job_api.submissions) == 3 and "504 scripted" in capsys.readouterr().err
