"""A rollout whose analysis reads a real Prometheus server (Debian's ``prometheus``), not the routers'
stats: the server scrapes the router pod on loopback (a static target with the labels the chart's
ServiceMonitor gives, ``namespace`` and ``captionmodel``) and the operator runs with
``--analysis-prometheus-url``. Prometheus' query log shows that the decisions came from its series."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

harness = sys.modules["captionfleet_e2e_harness"]
emulator = sys.modules["captionfleet_e2e_emulator"]

pytestmark = pytest.mark.e2e

NAME = "captions"
BUNDLED = "file:///opt/captionfleet/models/scenes-blip-tiny"
USERS = [f"user-{index}" for index in range(40)]


class PrometheusServer:
    """``prometheus`` on a free loopback port, scraping ``targets`` every second, its queries logged."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.query_log = workdir / "queries.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, targets: list[str], labels: dict[str, str]) -> None:
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "query_log_file": str(self.query_log),
            },
            "scrape_configs": [
                {
                    "job_name": "captionfleet-router",
                    "static_configs": [{"targets": targets, "labels": labels}],
                }
            ],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        argv = [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                assert self.process is not None and self.process.poll() is None, self.log_tail()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/-/ready") as response:
                        return response.status == 200
                return False

            deadline = asyncio.get_running_loop().time() + 60
            while not await up():
                assert asyncio.get_running_loop().time() < deadline, self.log_tail()
                await asyncio.sleep(0.1)

    def queries(self) -> list[str]:
        if not self.query_log.exists():
            return []
        lines = self.query_log.read_text().splitlines()
        return [json.loads(line)["params"]["query"] for line in lines if line.strip()]

    def log_tail(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            harness._stop_process(self.process)


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[PrometheusServer]:
    if shutil.which("prometheus") is None:
        raise RuntimeError("prometheus is not installed: `make promtool` installs Debian's package")
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    server = PrometheusServer(workdir)
    try:
        yield server
    finally:
        server.stop()


async def test_an_erroring_canary_is_rolled_back_on_the_figures_of_a_real_prometheus(
    fleet: Any, images: list[bytes], prometheus_server: PrometheusServer
) -> None:
    checks = {"interval": "1s", "window": "10s", "minRequests": 10, "stepWeight": 25, "maxWeight": 75}
    checks |= {"errorRateThreshold": 5, "threshold": 2}
    body = emulator.canary_model(
        NAME,
        BUNDLED,
        BUNDLED,
        checks,
        autoscaling={"provider": "none", "minReplicas": 1, "maxReplicas": 1},
        router={"replicas": 1},
        generation={"numBeams": 1, "maxNewTokens": 8},
    )
    fleet.start_kubelet({f"{NAME}-v2": 0.5})
    fleet.operator.start(analysis_prometheus_url=prometheus_server.url)
    await fleet.create(body)
    router = await fleet.router_url(NAME)
    prometheus_server.start([router.removeprefix("http://")], {"namespace": "ml", "captionmodel": NAME})
    await prometheus_server.ready()
    async with harness.Traffic(router, USERS, images, 30):
        await fleet.eventually(
            lambda: (fleet.status(NAME).get("rollout") or {}).get("phase") == "RolledBack",
            180,
            "the rollback",
        )
    fleet.check()
    state = fleet.status(NAME)["rollout"]
    assert (state["reason"], state["lastCheck"]["verdict"]) == ("ErrorRate", "fail"), state
    # Prometheus' increase() extrapolates over the window: near the injected 50 %, not exactly it.
    assert 25 <= state["lastCheck"]["errorRate"] <= 75, state
    labels = f'namespace="ml",captionmodel="{NAME}",version="v2"'
    asked = [q for q in prometheus_server.queries() if labels in q]
    assert any("captionfleet_router_upstream_errors_total" in q for q in asked), prometheus_server.queries()[
        :5
    ]
    assert any("captionfleet_router_requests_total" in q for q in asked)
    print(
        f"\nE2E Prometheus: rolled back at error rate {state['lastCheck']['errorRate']:.1f} % "
        f"({len(asked)} queries of the canary's series)"
    )
