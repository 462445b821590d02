"""``captionfleet router`` as a process: start, serve, drain on SIGTERM, refuse bad options, stay light."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import aiohttp

ROUTER = [sys.executable, "-m", "captionfleet", "router"]


async def _listening_port(stream: asyncio.StreamReader) -> int:
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError("the router exited before listening")
        entry = json.loads(line)
        if entry.get("message") == "listening":
            return int(entry["port"])


async def test_serves_then_drains_on_sigterm(start_runtime: Any, eventually: Any) -> None:
    runtime = await start_runtime("v1")
    process = await asyncio.create_subprocess_exec(
        *ROUTER,
        "--host", "127.0.0.1", "--port", "0", "--routes", f"v1={runtime.url}", "--drain-grace-s", "30",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        port = await asyncio.wait_for(_listening_port(process.stderr), timeout=60)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/readyz") as response:
                assert response.status == 200
            async with client.post(url + "/v1/caption", data=b"img", headers={"X-User-Id": "u"}) as response:
                assert response.status == 200 and (await response.json())["model_version"] == "v1"

            process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                async with client.get(url + "/readyz") as response:
                    return response.status == 503

            await eventually(draining, timeout_s=10, what="/readyz to say 503 while draining")
            async with client.post(url + "/v1/caption", data=b"img") as response:
                assert response.status == 200  # still serving while the endpoints move away
        process.send_signal(signal.SIGTERM)  # a second signal cuts the drain delay short
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_bad_options_exit_2_with_a_message() -> None:
    done = subprocess.run([*ROUTER, "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "exactly one source" in done.stderr
    done = subprocess.run(
        [*ROUTER, "--routes", "v1=http://a:1,v2=http://b:1", "--weights", "v1=60,v2=60"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "sum to 100" in done.stderr


def test_the_router_never_loads_torch() -> None:
    code = (
        "import sys, captionfleet.runtime.router.app, captionfleet.runtime.router.command; "
        "print(sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
