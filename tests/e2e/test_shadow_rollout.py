"""Rollouts judged on captions, end to end (real operator, serve and router processes): a shadow
phase before the first weight step, a canary whose confidence collapses at error rate 0, and a rollout
whose analysis reads a real Prometheus server.

The shadowed canary is the bundled model itself (its captions are the stable's: agreement 1.0). The
collapsed one is the bundled model with its logits scaled down: every argmax, so every
greedy caption, stays the same, while the softmax flattens and the confidence falls.

The Prometheus server is Debian's ``prometheus``: it scrapes the router pod on loopback (a static
target with the labels the chart's ServiceMonitor gives, ``namespace`` and ``captionmodel``), the
operator runs with ``--analysis-prometheus-url``, and Prometheus' query log shows that the decisions
came from its series.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import statistics
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
BUNDLED = emulator.BUNDLED_IN_IMAGE
USERS = [f"user-{index}" for index in range(40)]


def manifest(canary: str = BUNDLED, **analysis: Any) -> dict[str, Any]:
    checks = {"errorRateThreshold": 5, "threshold": 2} | analysis
    return emulator.one_pod_canary(NAME, canary, checks, generation={"numBeams": 1, "maxNewTokens": 8})


def rollout(fleet: Any) -> dict[str, Any]:
    return dict(fleet.status(NAME).get("rollout") or {})


async def stats(router: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(router + "/v1/router/stats?window=600") as response:
        return dict(await response.json())


async def start(fleet: Any, body: dict[str, Any]) -> str:
    fleet.start_kubelet()
    fleet.operator.start()
    await fleet.create(body)
    return str(await fleet.router_url(NAME))


def p50_ms(answers: list[Any]) -> float:
    return statistics.median((a.done - a.sent) * 1000 for a in answers)


async def test_a_good_canary_is_shadowed_with_no_user_served_then_the_weight_steps_begin(
    fleet: Any, images: list[bytes]
) -> None:
    mirror = {"percent": 50, "checks": 3, "minAgreement": 0.95}
    router = await start(fleet, manifest(mirror=mirror))
    async with (
        harness.StatusLog(fleet.api, "ml", NAME) as log,
        harness.Traffic(router, USERS, images, 30) as traffic,
    ):

        def stepped() -> bool:
            state = rollout(fleet)
            assert (state.get("shadow") or {}).get("done") and state.get("weight", 0) > 0, state
            return True

        await fleet.eventually(stepped, 120, "the shadow checks passed and the first step")
        shadow_figures = (await stats(router))["versions"]["v2"]["total"]["shadow"]
        stepped_at = log.first(lambda s: (s.get("rollout") or {}).get("weight", 0) > 0)
        copying_from = log.first(
            lambda s: ((s.get("rollout") or {}).get("shadow") or {}).get("copies", 0) > 0
        )
        await fleet.eventually(lambda: rollout(fleet).get("phase") == "Promoted", 120, "the promotion")
        await fleet.eventually(lambda: not fleet.kubelet.pods.get(f"{NAME}-v1"), 60, "v1 stopped")
        alone_from = harness.time.monotonic()  # v2 alone, no copies: the no-shadow figure
        await fleet.eventually(lambda: len(traffic.since(alone_from)) >= 150, 60, "traffic without shadow")
    fleet.check()

    assert stepped_at is not None and copying_from is not None
    before = [a for a in traffic.answers if a.done < stepped_at]
    # During the shadow checks clients got only the stable's answers, and all of them.
    assert len(before) >= 30 and {(a.status, a.version) for a in before} == {(200, "v1")}
    shadowed = [a for a in before if a.sent >= copying_from]  # copies going on (the canary's pod up)
    passes = [m for _, _, m in fleet.events(NAME, "ShadowCheckPassed")]
    assert len(passes) == 2, passes
    steps = await fleet.eventually(lambda: fleet.events(NAME, "CanaryStep"), 30, "the CanaryStep Event")
    first_step = steps[0][2]
    assert "0 % -> 25 %" in first_step and "shadow checks passed" in first_step, first_step
    state = rollout(fleet)
    assert state["shadow"]["passed"] == 3 and state["shadow"]["agreement"] >= 0.95, state
    assert shadow_figures["copies"] >= 10 and shadow_figures["errors"] == 0, shadow_figures
    assert shadow_figures["agreement"] >= 0.95 and shadow_figures["token_overlap"] >= 0.95, shadow_figures
    alone = traffic.since(alone_from)
    assert all(a.status == 200 for a in alone)
    print(
        f"\nE2E shadow: {shadow_figures['copies']} copies, agreement {shadow_figures['agreement']:.3f}, "
        f"token overlap {shadow_figures['token_overlap']:.3f}, dropped {shadow_figures['dropped']}; "
        f"client p50 {p50_ms(shadowed):.1f} ms under shadow ({len(shadowed)} requests) against "
        f"{p50_ms(alone):.1f} ms without ({len(alone)} requests, one version alone)"
    )


def collapsed_model(directory: Path, factor: float) -> Path:
    """The bundled model with its logits multiplied by ``factor`` (the same argmax everywhere)."""
    import torch
    from safetensors.torch import load_file, save_file

    source = harness.REPO / "runtime" / "models" / "scenes-blip-tiny"
    target = directory / "collapsed"
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    # logits = LayerNorm(h) . E^T + bias (E tied to the word embeddings): scaling the LayerNorm's
    # weight and bias and the output bias scales every logit by ``factor``.
    prefix = "text_decoder.cls.predictions."
    head = [prefix + "transform.LayerNorm.weight", prefix + "transform.LayerNorm.bias", prefix + "bias"]
    for key in head:
        tensors[key] = (tensors[key].to(torch.float32) * factor).to(tensors[key].dtype).contiguous()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


async def test_a_canary_whose_confidence_collapses_is_rolled_back_at_error_rate_0(
    fleet: Any, images: list[bytes], tmp_path: Path
) -> None:
    canary = collapsed_model(tmp_path, 0.25)
    router = await start(fleet, manifest(f"file://{canary}", maxConfidenceDrop=0.1))
    async with harness.Traffic(router, USERS, images, 30) as traffic:
        await fleet.eventually(lambda: rollout(fleet).get("phase") == "RolledBack", 120, "the rollback")
    fleet.check()
    state = rollout(fleet)
    check = state["lastCheck"]
    assert state["reason"] == "ConfidenceDrop" and check["errors"] == 0 and check["requests"] >= 10, state
    assert check["stableConfidence"] - check["confidence"] > 0.1, check
    served = [a for a in traffic.answers if a.version == "v2"]
    assert served and all(a.status == 200 for a in traffic.answers), "the canary answered, without errors"
    print(
        f"\nE2E confidence: canary mean {check['confidence']:.3f} against the stable's "
        f"{check['stableConfidence']:.3f}, {check['requests']} canary requests, 0 errors"
    )


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
    body = manifest(interval="1s")
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
