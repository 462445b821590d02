"""``captionfleet operator``: its options, and the real command against the emulated API server."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from typing import Any

import aiohttp
import pytest

from captionfleet.operator import command
from captionfleet.operator.settings import OperatorSettings
from captionfleet.settings import from_args


def parse(argv: list[str]) -> OperatorSettings:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return from_args(OperatorSettings, parser.parse_args(argv))


def test_defaults_are_documented_and_usable() -> None:
    settings = parse([])
    assert settings == OperatorSettings()
    assert settings.namespaces == ()  # the whole cluster
    assert settings.default_runtime_image.startswith("ghcr.io/captionfleet/runtime:")


def test_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONFLEET_NAMESPACES", "ml,ml-staging")
    monkeypatch.setenv("CAPTIONFLEET_RESYNC_SECONDS", "60")
    settings = parse(["--prometheus-url", "http://prom:9090", "--standalone", "true"])
    assert settings.namespaces == ("ml", "ml-staging")
    assert settings.resync_seconds == 60.0
    assert settings.prometheus_url == "http://prom:9090"
    assert settings.standalone is True


@pytest.mark.e2e
async def test_the_command_runs_the_operator_and_stops_on_sigterm(cluster: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "captionfleet", "operator",
        "--kubeconfig", str(cluster.kubeconfig),
        "--namespaces", "ml",
        "--standalone", "true",
        "--liveness", f"http://127.0.0.1:{port}/healthz",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await cluster.apply_example("minimal.yaml")
        await cluster.eventually(lambda: _pending(cluster, process), within=60)
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as rsp:
            assert rsp.status == 200
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()[-3000:]


def _pending(cluster: Any, process: Any) -> None:
    assert process.returncode is None, "the operator exited"
    assert cluster.status("captions").get("phase") == "Pending"
