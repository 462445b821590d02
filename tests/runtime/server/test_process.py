"""``captionfleet serve`` as a real process: readiness, SIGTERM during load, exit codes, JSON logs."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp

from captionfleet.runtime.server.testing import encode, shapes_image
from captionfleet.settings.serve import ServeSettings

REQUESTS = 32


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = (
        "^"
        + re.escape(name)
        + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{[^}]*\})?")
        + r" (\S+)$"
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(found.lastindex or 1)) if found else 0.0


async def test_sigterm_during_load_drops_no_accepted_request(serve_process, tiny_model_dir: Path) -> None:
    # Slow enough per request (batches of one, long beam search) that the load outlasts the signal.
    settings = ServeSettings(
        model=str(tiny_model_dir), max_batch_size=1, num_beams=4, max_new_tokens=40, cache_size=0,
        drain_grace_s=60.0, torch_threads=1,
    )  # fmt: skip
    process = serve_process(settings)
    await asyncio.to_thread(process.wait_ready)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def caption(index: int) -> int:
            async with http.post(process.url + "/v1/caption", data=encode(shapes_image(index))) as response:
                assert response.status == 200, await response.text()
                return response.status

        tasks = [asyncio.ensure_future(caption(i)) for i in range(REQUESTS)]
        accepted = 0.0

        async def all_accepted() -> bool:
            nonlocal accepted
            async with http.get(process.url + "/metrics") as response:
                text = await response.text()
            done = _metric(text, "captionfleet_requests_total", 'code="200",route="/v1/caption"')
            accepted = done + _metric(text, "captionfleet_requests_in_flight")
            return accepted >= REQUESTS

        try:
            ends = asyncio.get_running_loop().time() + 60
            while not await all_accepted():  # poll with a deadline
                assert asyncio.get_running_loop().time() < ends, f"only {accepted} of {REQUESTS} accepted"
                await asyncio.sleep(0.02)
            process.terminate()
            statuses = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            for task in tasks:
                task.cancel()
    assert statuses == [200] * REQUESTS
    assert await asyncio.to_thread(process.wait, 60) == 0
    logs = [json.loads(line) for line in process.log_text().splitlines() if line.startswith("{")]
    draining = [entry for entry in logs if entry["message"].startswith("draining:")]
    assert draining, process.log_text()
    in_flight_at_signal = int(draining[0]["message"].split()[1])
    assert in_flight_at_signal > 0, "the load finished before the signal: the test proved nothing"
    assert any(entry["message"].startswith("drained: 0 requests") for entry in logs)
    access = [entry for entry in logs if entry["logger"] == "captionfleet.runtime.server.access"]
    assert access and all(entry["request_id"] for entry in access)


def test_a_model_that_cannot_load_exits_non_zero_with_a_clear_log(serve_process, tmp_path: Path) -> None:
    process = serve_process(ServeSettings(model=str(tmp_path / "no-such-model")))
    assert process.wait(120) == 1
    errors = [json.loads(line) for line in process.log_text().splitlines() if line.startswith("{")]
    assert any(entry["level"] == "error" and "no-such-model" in entry["message"] for entry in errors)


def test_bad_settings_are_refused_before_anything_starts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captionfleet", "serve", "--max-batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "max_batch_size must be > 0" in done.stderr


def test_help_documents_every_option_and_its_environment_variable() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captionfleet", "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for name in (
        "MAX_BATCH_SIZE",
        "MAX_QUEUE_DELAY_MS",
        "REDIS_URL",
        "API_KEYS_FILE",
        "DRAIN_GRACE_S",
        "STYLE",
    ):
        assert f"CAPTIONFLEET_{name}" in done.stdout
