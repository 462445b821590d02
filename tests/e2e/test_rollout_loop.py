"""The whole rollout loop, end to end: the real operator (a process) against the emulated API server,
real ``captionfleet serve`` and ``captionfleet router`` processes started by the test's kubelet, and
real HTTP traffic from many user ids through the router.

Each test writes a CaptionModel with two versions of the bundled model (the canary marked), waits
until the router routes both, sends traffic and watches what the operator decides and what the clients
see. Fault injection is the test's proxy in front of the canary's runtime (``harness.FaultProxy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import aiohttp
import pytest

harness = sys.modules["captionfleet_e2e_harness"]
emulator = sys.modules["captionfleet_e2e_emulator"]

pytestmark = pytest.mark.e2e

NAME = "captions"
INTERVAL_S = 0.5
USERS = [f"user-{index}" for index in range(60)]  # at 60 requests/s: each user about once a second


def model(**analysis: Any) -> dict[str, Any]:
    """Both versions the bundled model; short checks, so that a rollout ends within a test."""
    # A 10 s window reaches minRequests at the canary's share even when a loaded machine serves a few
    # requests per second (with 2 s every check held there).
    checks = {"interval": f"{int(INTERVAL_S * 1000)}ms", "errorRateThreshold": 5, "threshold": 2}
    generation = {"numBeams": 1, "maxNewTokens": 8}
    return emulator.one_pod_canary(NAME, emulator.BUNDLED_IN_IMAGE, checks | analysis, generation=generation)


async def serving(fleet: Any, manifest: dict[str, Any], faults: dict[str, float] | None = None) -> str:
    """Create the CaptionModel, run its fleet, and return a router URL once both versions are routed."""
    fleet.start_kubelet(faults)
    fleet.operator.start()
    await fleet.create(manifest)
    router = await fleet.router_url(NAME)
    await routed(fleet, router, lambda table: {v for v, (_, ready) in table.items() if ready} == {"v1", "v2"})
    return str(router)


async def routed(
    fleet: Any, router: str, holds: Any, within: float = 120, what: str = "both routed"
) -> float:
    """Poll the router's table ({version: (weight, ready)}) until ``holds`` says yes; the moment it did.

    A request the clients send after that moment is routed by that table: waits for the routers to
    have a decision are this, never a guess of how long they take."""
    deadline = time.monotonic() + within
    table: dict[str, tuple[int, bool]] = {}
    while time.monotonic() < deadline:
        fleet.check()
        with contextlib.suppress(aiohttp.ClientError, KeyError, ValueError):
            found = await fleet.routes(router)
            table = {v["version"]: (v["weight"], bool(v.get("ready"))) for v in found.get("models", [])}
            if holds(table):
                return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within:.0f} s waiting for the router: {what}; last table {table}")


def rollout(fleet: Any) -> dict[str, Any]:
    return dict(fleet.status(NAME).get("rollout") or {})


def rollout_in(fleet: Any, phase: str) -> bool:
    """Whether the rollout reached ``phase``; the state it is in when not (a timeout shows it)."""
    state = rollout(fleet)
    assert state.get("phase") == phase, state
    return True


def weight_history(log: Any) -> list[int]:
    """The canary's weights in status.rollout, in order, repeats removed."""
    found: list[int] = []
    for _, state in log.rollouts():
        if "weight" in state and (not found or found[-1] != state["weight"]):
            found.append(state["weight"])
    return found


def versions_by_user(answers: list[Any]) -> dict[str, list[str]]:
    by_user: dict[str, list[str]] = {}
    for answer in sorted(answers, key=lambda a: a.sent):
        if answer.status == 200:
            by_user.setdefault(answer.user, []).append(answer.version)
    return by_user


async def test_a_healthy_canary_is_promoted_step_by_step_and_users_stay_sticky(
    fleet: Any, images: list[bytes]
) -> None:
    router = await serving(fleet, model(interval="1s"))  # steps long enough to see every user
    async with (
        harness.StatusLog(fleet.api, "ml", NAME) as log,
        harness.Traffic(router, USERS, images, 60) as traffic,
    ):
        await fleet.eventually(lambda: rollout_in(fleet, "Promoted"), 120, "the promotion")
        # Every user gets answers after the router has the promotion: all on v2.
        promoted_at = await routed(
            fleet, router, lambda table: table.get("v2", (0, False))[0] == 100, 30, "v2 at 100 %"
        )
        await fleet.eventually(
            lambda: {a.user for a in traffic.since(promoted_at) if a.status == 200} >= set(USERS),
            30,
            "an answer for every user after the promotion",
        )
    fleet.check()

    assert weight_history(log) == [25, 50, 75, 100]
    steps = [message for _, _, message in fleet.events(NAME, "CanaryStep")]
    assert [m.split(": ", 1)[1].split(" (")[0] for m in steps] == ["25 % -> 50 %", "50 % -> 75 %"], steps
    # An Event is posted after the status change it reports: it may be a moment behind.
    promoted = await fleet.eventually(lambda: fleet.events(NAME, "Promoted"), 30, "the Promoted Event")
    assert len(promoted) == 1 and "healthy at 75 %" in promoted[0][2], promoted
    status = fleet.status(NAME)
    assert (status["stableVersion"], status.get("canaryVersion")) == ("v2", None)

    # Clients never failed, and answers say who answered.
    assert traffic.answers and all(a.status == 200 for a in traffic.answers), [
        a for a in traffic.answers if a.status != 200
    ][:5]
    # Sticky: a user moves at most once, from v1 to v2; nobody moves back while the canary grows.
    by_user = versions_by_user(traffic.answers)
    moved_back = {u: vs for u, vs in by_user.items() if "v1" in vs[vs.index("v2") :] if "v2" in vs}
    assert not moved_back, list(moved_back.items())[:3]
    moved = [u for u, vs in by_user.items() if vs[0] == "v1" and vs[-1] == "v2"]
    late = {u: vs[-1] for u, vs in versions_by_user(traffic.since(promoted_at)).items()}
    assert set(late.values()) == {"v2"}
    assert len(moved) >= len(USERS) // 2, f"most users start on v1 and move once: {len(moved)} did"
    # While the canary held 25 %, about a quarter of the users were on it.
    left_25 = log.first(lambda s: (s.get("rollout") or {}).get("weight", 25) > 25)
    first_steps = versions_by_user([a for a in traffic.answers if a.done < left_25])
    assert len(first_steps) >= len(USERS) // 2, len(first_steps)
    share = sum(1 for vs in first_steps.values() if vs[0] == "v2") / max(1, len(first_steps))
    assert 0.12 < share < 0.40, share

    # The old stable scaled to zero: its process is gone, its endpoints unpublished.
    await fleet.eventually(lambda: not fleet.kubelet.pods.get(f"{NAME}-v1"), 30, "v1's pods stopped")
    assert not [
        n for n in fleet.api.names("discovery.k8s.io/v1/endpointslices", "ml") if n.startswith(f"{NAME}-v1-")
    ]


async def test_an_erroring_canary_is_rolled_back_and_gets_no_traffic_once_the_router_knows(
    fleet: Any, images: list[bytes]
) -> None:
    router = await serving(fleet, model(), faults={f"{NAME}-v2": 0.5})
    async with (
        harness.StatusLog(fleet.api, "ml", NAME) as log,
        harness.Traffic(router, USERS, images, 60) as traffic,
    ):
        await fleet.eventually(lambda: rollout_in(fleet, "RolledBack"), 120, "the rollback")
        decided = await fleet.eventually(
            lambda: log.first(lambda s: (s.get("rollout") or {}).get("phase") == "RolledBack"), 5, "the log"
        )
        # From the moment the router has the rollback, the canary gets nothing (how long that took is
        # printed below: a figure of the machine's load, not a pass/fail).
        quiet_from = await routed(
            fleet, router, lambda table: table.get("v2", (0, False))[0] == 0, 30, "v2 at 0 %"
        )
        # Enough traffic after that moment to see whether the canary still gets any.
        await fleet.eventually(
            lambda: len(traffic.since(quiet_from)) >= 100, 30, "traffic after the rollback"
        )
    fleet.check()
    proxy = fleet.kubelet.proxies[0]

    state = rollout(fleet)
    assert (state["weight"], state["reason"], state["lastCheck"]["verdict"]) == (0, "ErrorRate", "fail")
    assert 30 <= state["lastCheck"]["errorRate"] <= 70, state
    conditions = {c["type"]: c for c in fleet.status(NAME)["conditions"]}
    assert (
        conditions["RolledBack"]["status"] == "True" and "error rate" in conditions["RolledBack"]["message"]
    )
    assert fleet.status(NAME)["phase"] == "RolledBack"
    rolled_back = await fleet.eventually(lambda: fleet.events(NAME, "RolledBack"), 30, "the RolledBack Event")
    assert [kind for kind, _, _ in rolled_back] == ["Warning"], rolled_back

    # Once the router had the rollback, no request sent reached the canary.
    assert proxy.arrivals, "the canary got traffic before the rollback"
    late = [a for a in traffic.since(quiet_from) if a.version == "v2"]
    assert not late, f"{len(late)} requests sent after the router had the rollback reached the canary"
    # The clients saw exactly the injected failures: nothing else failed, none after the rollback.
    failed = [a for a in traffic.answers if a.status != 200]
    assert all(a.status == 500 and a.version == "v2" for a in failed), (
        [a for a in failed if a.status != 500][:5],
        fleet.kubelet.warnings(f"{NAME}-router"),
    )
    assert len(failed) == len(proxy.injected) <= len(proxy.arrivals) // 2 + 1
    assert not [a for a in failed if a.sent > quiet_from]
    fault_to_quiet = proxy.arrivals[-1] - proxy.arrivals[0]
    print(
        f"\nE2E rollback: fault start -> last canary request {fault_to_quiet:.2f} s; decision -> last canary "
        f"request {proxy.arrivals[-1] - decided:+.2f} s; decision -> router without the canary "
        f"{quiet_from - decided:.2f} s (two intervals: {2 * INTERVAL_S:.1f} s); {len(failed)} of "
        f"{len(traffic.answers)} client requests failed ({len(proxy.arrivals)} reached the canary)"
    )
    # The rolled-back canary's pods are stopped.
    await fleet.eventually(lambda: not fleet.kubelet.pods.get(f"{NAME}-v2"), 30, "v2's pods stopped")


async def test_traffic_below_min_requests_never_rolls_back(fleet: Any, images: list[bytes]) -> None:
    # Every canary request fails and one failed check would roll back, but the traffic stays far
    # below minRequests: every check holds.
    manifest = model(minRequests=1000, threshold=1)
    router = await serving(fleet, manifest, faults={f"{NAME}-v2": 1.0})
    async with (
        harness.StatusLog(fleet.api, "ml", NAME) as log,
        harness.Traffic(router, USERS, images, 20) as traffic,
    ):

        def checks_with_canary_traffic() -> int:
            fleet.check()
            times = {
                s["lastCheck"]["time"]
                for _, s in log.rollouts()
                if s.get("lastCheck", {}).get("requests", 0) > 0
            }
            return len(times) >= 4

        await fleet.eventually(checks_with_canary_traffic, 60, "four checks that saw canary traffic")
    proxy = fleet.kubelet.proxies[0]
    assert proxy.injected, "the canary's requests failed"
    assert any(a.status == 500 for a in traffic.answers)
    for _, state in log.rollouts():
        assert (state.get("phase"), state.get("weight"), state.get("failedChecks")) == (
            "Progressing",
            25,
            0,
        ), state
    state = rollout(fleet)
    assert state["lastCheck"]["verdict"] == "hold" and "below minRequests 1000" in state["message"], state
    assert not fleet.events(NAME, "CheckFailed") and not fleet.events(NAME, "RolledBack")


async def test_the_operator_killed_mid_rollout_resumes_at_the_same_step(
    fleet: Any, images: list[bytes]
) -> None:
    router = await serving(fleet, model(stepWeight=20, maxWeight=80, interval="1s"))
    async with (
        harness.StatusLog(fleet.api, "ml", NAME) as log,
        harness.Traffic(router, USERS, images, 60) as traffic,
    ):
        await fleet.eventually(lambda: rollout(fleet).get("weight", 0) >= 40, 120, "the canary at 40 %")
        fleet.operator.kill()
        killed_at = time.monotonic()
        held = rollout(fleet)
        assert held["phase"] == "Progressing" and held["weight"] < 80, held
        # Without the operator, nothing moves and the routers keep serving the same split.
        await fleet.eventually(
            lambda: len(traffic.since(killed_at)) >= 150, 30, "traffic while the operator is away"
        )
        assert rollout(fleet) == held
        away = {a.version for a in traffic.since(killed_at) if a.status == 200}
        assert away == {"v1", "v2"}, away

        fleet.operator.start()
        await fleet.eventually(lambda: rollout_in(fleet, "Promoted"), 120, "the promotion after the restart")
    fleet.check()

    # After the restart the weight only grows from where it was: never back to an earlier step.
    after = [state["weight"] for t, state in log.rollouts() if t > killed_at and "weight" in state]
    # (Status writes that keep the weight, e.g. a check that held, may come first: the first *change*
    # counts.)
    assert after == sorted(after) and after[0] >= held["weight"], (held["weight"], after)
    first_change = next(w for w in after if w != held["weight"])
    assert first_change == held["weight"] + 20, (held["weight"], after)
    # Every step announced once (a restart repeats none); from the held weight on, each step in turn. The
    # Event of the step that reached the held weight may land after the kill, so the steps are picked
    # by where they start, not by when they were counted.
    steps = [m.split(": ", 1)[1].split(" (")[0] for _, _, m in fleet.events(NAME, "CanaryStep")]
    assert len(steps) == len(set(steps)), steps
    after_kill = [step for step in steps if int(step.split(" %")[0]) >= held["weight"]]
    expected = [f"{w} % -> {w + 20} %" for w in range(held["weight"], 80, 20)]
    assert after_kill == expected, steps
    failed = [(round(a.sent - killed_at, 2), a.status, a.version) for a in traffic.answers if a.status != 200]
    assert not failed, failed  # (seconds after the kill, status, version)
