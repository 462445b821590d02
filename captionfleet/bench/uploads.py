"""Peak memory under many large uploads at once: ``python -m captionfleet.bench.uploads``.

Starts ``captionfleet serve`` (the bundled model) and ``captionfleet router`` in front of it, sends
``--clients`` concurrent uploads of ``--megabytes`` each (a PNG signature and random bytes: read whole,
then refused as not decodable, so what is measured is the bytes the edge holds), and prints each
process's peak resident memory (``VmHWM``) and the answers' statuses as JSON. ``--python`` and
``--pythonpath`` run another checkout's code for a side-by-side run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from captionfleet.runtime.server.testing import free_port


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _wait_ready(url: str, deadline_s: float = 180) -> None:
    ends = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < ends:
            try:
                async with client.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not get ready")


async def _upload_all(url: str, clients: int, body: bytes) -> dict[str, int]:
    statuses: collections.Counter[str] = collections.Counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as client:

        async def one() -> None:
            try:
                headers = {"Content-Type": "image/png", "X-Request-Timeout-Ms": "300000"}
                async with client.post(url + "/v1/caption", data=body, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except aiohttp.ClientError as exc:
                statuses[type(exc).__name__] += 1

        await asyncio.gather(*(one() for _ in range(clients)))
    return dict(statuses)


def _start(argv: list[str], python: str, pythonpath: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.Popen(
        [python, "-m", "captionfleet", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def measure(clients: int, megabytes: float, python: str, pythonpath: str) -> dict[str, object]:
    serve_port, router_port = free_port(), free_port()
    serve_url, router_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{router_port}"
    serve = _start(
        ["serve", "--host", "127.0.0.1", "--port", str(serve_port), "--torch-threads", "1"],
        python,
        pythonpath,
    )
    router = _start(
        ["router", "--host", "127.0.0.1", "--port", str(router_port), "--routes", f"v1={serve_url}"],
        python,
        pythonpath,
    )
    try:
        await _wait_ready(serve_url)
        await _wait_ready(router_url)
        body = b"\x89PNG\r\n\x1a\n" + os.urandom(int(megabytes * 1024 * 1024) - 8)
        idle = {"serve": _peak_rss_mb(serve.pid), "router": _peak_rss_mb(router.pid)}
        direct = await _upload_all(serve_url, clients, body)
        routed = await _upload_all(router_url, clients, body)
        return {
            "clients": clients,
            "megabytes": megabytes,
            "idle_peak_rss_mb": idle,
            "peak_rss_mb": {"serve": _peak_rss_mb(serve.pid), "router": _peak_rss_mb(router.pid)},
            "statuses": {"serve": direct, "through_router": routed},
        }
    finally:
        for process in (router, serve):
            process.terminate()
        for process in (router, serve):
            process.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--megabytes", type=float, default=14.0)
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the code to measure")
    parser.add_argument("--pythonpath", default="", help="PYTHONPATH for it (another checkout)")
    args = parser.parse_args(argv)
    print(
        json.dumps(asyncio.run(measure(args.clients, args.megabytes, args.python, args.pythonpath)), indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
