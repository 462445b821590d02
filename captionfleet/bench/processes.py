"""The servers a benchmark runs against, each a real subprocess on a free loopback port.

``captionfleet serve`` goes through the runtime's own :class:`ServeProcess`; the naive baseline and the
router through :class:`Subprocess`, which works the same way: JSON or text logs in a file, readiness
polled on ``/readyz`` with a deadline, killed on exit.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from captionfleet.runtime.server.testing import (
    STARTUP_DEADLINE_S,
    ServeProcess,
    free_port,
    own_env,
    readyz_answers_200,
)
from captionfleet.settings.serve import ServeSettings


class Server(Protocol):
    url: str

    def is_ready(self) -> bool: ...

    def stop(self) -> None: ...


class Subprocess:
    """A Python module run as ``python -m module ...`` that serves HTTP at ``url`` once ready."""

    def __init__(
        self, name: str, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=self._log, stderr=subprocess.STDOUT, env=own_env(env)
        )

    def is_ready(self) -> bool:
        if self.process.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{log}")
        return readyz_answers_200(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()


def start_ours(
    model_dir: Path,
    workdir: Path,
    *,
    cache: bool,
    base: ServeSettings,
    name: str,
    env: dict[str, str] | None = None,
) -> ServeProcess:
    """``captionfleet serve`` for ``model_dir``; ``cache=False`` turns the result cache off."""
    settings = dataclasses.replace(
        base, model=str(model_dir), port=free_port(), cache_size=base.cache_size if cache else 0
    )
    return ServeProcess(settings, workdir / f"{name}.log", env=env)


def start_baseline(
    model_dir: Path,
    workdir: Path,
    *,
    num_beams: int,
    max_new_tokens: int,
    torch_threads: int,
    name: str,
    env: dict[str, str] | None = None,
) -> Subprocess:
    port = free_port()
    argv = [
        "captionfleet.bench.baseline", "--model", str(model_dir), "--port", str(port),
        "--num-beams", str(num_beams), "--max-new-tokens", str(max_new_tokens),
        "--torch-threads", str(torch_threads),
    ]  # fmt: skip
    return Subprocess(name, argv, port, workdir / f"{name}.log", env=env)


def start_router(upstream_url: str, workdir: Path) -> Subprocess:
    """``captionfleet router`` with one static route to ``upstream_url`` (no cluster needed)."""
    port = free_port()
    argv = [
        "captionfleet", "router", "--host", "127.0.0.1", "--port", str(port),
        "--routes", f"bench={upstream_url}", "--drain-grace-s", "0",
    ]  # fmt: skip
    return Subprocess("router", argv, port, workdir / "router.log")


def wait_all_ready(servers: list[Server], deadline_s: float = STARTUP_DEADLINE_S) -> None:
    """Poll every server's ``/readyz`` until all say 200; they start in parallel."""
    ends = time.monotonic() + deadline_s
    pending = list(servers)
    while pending:
        pending = [server for server in pending if not server.is_ready()]
        if pending and time.monotonic() > ends:
            names = ", ".join(server.url for server in pending)
            raise RuntimeError(f"not ready within {deadline_s:.0f} s: {names}")
        if pending:
            time.sleep(0.1)
