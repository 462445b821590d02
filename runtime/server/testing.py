"""Helpers for tests (and benchmarks) that run real servers: ports, polling, subprocesses, Redis.

Nothing here fakes the server: ``ServeProcess`` runs ``captionfleet serve`` itself, ``RedisProcess``
a real ``redis-server``. Waiting is polling with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from PIL import Image, ImageDraw

from captionfleet.settings.serve import ServeSettings

STARTUP_DEADLINE_S = 180.0


def own_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child server, without our settings (``CAPTIONFLEET_*``) but
    for those in ``env``: a developer's exported options must not change what a test starts."""
    chosen = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
    return chosen | (env or {})


def readyz_answers_200(url: str) -> bool:
    """Whether ``GET {url}/readyz`` answers 200 now (not listening yet, or 503: False)."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll ``condition`` until it holds: a short poll interval, a hard deadline."""
    ends = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > ends:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.05)


async def eventually(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    """The async twin of :func:`wait_until`."""
    ends = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > ends:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve a small aiohttp app (an image host, a webhook receiver) on a free loopback port; returns
    its runner (``await runner.cleanup()`` stops it) and the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    (image.convert("RGB") if fmt == "JPEG" else image).save(buffer, fmt, **params)
    return buffer.getvalue()


def shapes_image(index: int, size: int = 96) -> Image.Image:
    """A distinct, deterministic little picture per index (for the tiny model's mechanics tests)."""
    palette = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (240, 220, 30), (150, 60, 200), (20, 20, 20)]
    background = palette[index % len(palette)]
    fill = palette[(index // len(palette) + 1 + index) % len(palette)]
    if fill == background:
        fill = (255, 255, 255)
    image = Image.new("RGB", (size, size), background)
    step = size // 8
    x, y = (index * 3) % 6 * step, (index * 5) % 6 * step
    ImageDraw.Draw(image).rectangle([x, y, x + 2 * step + index % 3 * step, y + 2 * step], fill=fill)
    return image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 MP) that is only ~50 KB on the wire."""
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def settings_argv(settings: ServeSettings) -> list[str]:
    """Command-line options for every setting that differs from its default."""
    argv: list[str] = []
    for field in dataclasses.fields(ServeSettings):
        value = getattr(settings, field.name)
        if value == field.default or (isinstance(value, tuple) and not value):
            continue
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        argv += ["--" + field.name.replace("_", "-"), text]
    return argv


class ServeProcess:
    """``captionfleet serve`` in a subprocess on a free loopback port, its JSON logs in a file.

    The settings' port is used only when it is not the default (8080), which another process on a
    shared machine may hold."""

    def __init__(self, settings: ServeSettings, log_path: Path, env: dict[str, str] | None = None) -> None:
        default_port = ServeSettings.__dataclass_fields__["port"].default
        self.port = free_port() if settings.port in (0, default_port) else settings.port
        self.settings = dataclasses.replace(settings, host="127.0.0.1", port=self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = [sys.executable, "-m", "captionfleet", "serve", *settings_argv(self.settings)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=own_env(env))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_text()}")
        return readyz_answers_200(self.url)

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE_S) -> None:
        wait_until(self.is_ready, deadline_s, "/readyz of captionfleet serve")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()


class RedisProcess:
    """A throw-away ``redis-server`` on a free loopback port; without persistence unless ``appendonly``
    (then every write is fsynced to the append-only file, and :meth:`restart` keeps the data)."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is missing: `make redis-server` installs Debian's package")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
        )
        self.argv = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                     "--dir", str(workdir)]  # fmt: skip
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 30, "redis-server to answer PING")
        return self.process

    def restart(self) -> None:
        """Stop (SIGTERM: redis-server writes out what it holds) and start again on the same port."""
        self.stop()
        self._start()

    def kill(self) -> None:
        """SIGKILL, as a crash or an evicted pod: only what the append-only file holds survives;
        :meth:`start_again` brings it back on the same port."""
        self.process.kill()
        self.process.wait(timeout=30)

    def start_again(self) -> None:
        self._start()

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
