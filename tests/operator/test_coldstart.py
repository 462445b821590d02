"""Scale to zero, pure: the phases a version moves through, what the builders make of each, its status,
and the GPU resource name rules."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from captionfleet.operator import builders, coldstart, rollout, spec
from captionfleet.operator.builders import autoscaling, runtime
from captionfleet.operator.builders.common import ColdPhase, FleetContext
from captionfleet.operator.builders.replicas import replica_bounds
from captionfleet.operator.coldstart import ColdState, Demand
from captionfleet.operator.status import fleet_status

from .test_builders import CONFIG, context, example

AFTER_S = 60.0
NOW = 1_000_000.0


def cold_context(phase: ColdPhase, provider: str = "hpa", **autoscaling_fields: Any) -> FleetContext:
    raw = example("scale-to-zero.yaml")
    raw["autoscaling"] = {**raw["autoscaling"], "provider": provider, **autoscaling_fields}
    return context(raw).with_cold({"v1": phase})


@pytest.mark.parametrize(
    ("state", "demand", "ready", "phase"),
    [
        # idle for scaleToZeroAfter since the last request: to zero
        (ColdState("Ready", NOW - 500), Demand(0, NOW - AFTER_S, True), 1, "Idle"),
        # a request 59 s ago: stays
        (ColdState("Ready", NOW - 500), Demand(0, NOW - AFTER_S + 1, True), 1, "Ready"),
        # no request ever, but it woke only 10 s ago: stays
        (ColdState("Ready", NOW - 10), Demand(0, None, True), 1, "Ready"),
        # no router answered: nothing is decided on silence
        (ColdState("Ready", NOW - 500), Demand(), 1, "Ready"),
        # a held request wakes an idle version; none leaves it asleep
        (ColdState("Idle", NOW - 500), Demand(3, NOW, True), 0, "Waking"),
        (ColdState("Idle", NOW - 500), Demand(0, NOW - 400, True), 0, "Idle"),
        # a pod Pending far longer than scaleToZeroAfter is kept while requests wait for it
        (ColdState("Waking", NOW - 10 * AFTER_S, NOW - 10 * AFTER_S), Demand(2, NOW - 10 * AFTER_S, True), 0,
         "Waking"),
        # the first ready pod: awake
        (ColdState("Waking", NOW - 5), Demand(2, NOW - 5, True), 1, "Ready"),
        # nothing held any more and idle long enough: back to zero
        (ColdState("Waking", NOW - 500), Demand(0, NOW - 400, True), 0, "Idle"),
    ],
)  # fmt: skip
def test_a_version_moves_between_ready_idle_and_waking(
    state: ColdState, demand: Demand, ready: int, phase: str
) -> None:
    assert coldstart.decide(state, demand, ready, AFTER_S, NOW).phase == phase


def test_the_last_request_is_the_latest_of_every_router_and_held_requests_add_up() -> None:
    bodies = [
        {"versions": {"v1": {"held": 2, "last_request_at": 10.0}}},
        {"versions": {"v1": {"held": 3, "last_request_at": 12.5}, "v2": {"held": 7}}},
        {"versions": {}},
    ]
    assert coldstart.demand_of(bodies, "v1") == Demand(5, 12.5, True)
    assert coldstart.demand_of([], "v1") == Demand(0, None, False)
    state = coldstart.decide(ColdState("Ready", 0.0, 20.0), Demand(0, 12.5, True), 1, AFTER_S, 30.0)
    assert state.last_request_at == 20.0  # a router that restarted forgets; the status does not


def _by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in manifests if m["metadata"]["name"] == "fleet-v1"}


@pytest.mark.parametrize(
    ("phase", "replicas", "has_hpa"), [("Idle", 0, False), ("Waking", 1, True), ("Ready", None, True)]
)
def test_at_zero_no_hpa_waking_the_first_pod_ready_the_hpa_owns_replicas(
    phase: ColdPhase, replicas: int | None, has_hpa: bool
) -> None:
    children = _by_kind(builders.fleet(cold_context(phase)))
    assert children["Deployment"]["spec"].get("replicas") == replicas
    assert ("HorizontalPodAutoscaler" in children) is has_hpa
    if has_hpa:
        assert children["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 1


@pytest.mark.parametrize(("phase", "floor"), [("Idle", 0), ("Waking", 1), ("Ready", 1)])
def test_keda_goes_to_zero_only_when_the_operator_says_so(phase: ColdPhase, floor: int) -> None:
    ctx = cold_context(phase, provider="keda")
    scaled = autoscaling.autoscaler(ctx, ctx.spec.versions[0])
    assert scaled is not None and scaled["spec"]["minReplicaCount"] == floor


def test_without_an_autoscaler_the_operator_sets_replicas_in_every_phase() -> None:
    counts = {
        phase: runtime.deployment(cold_context(phase, "none"), spec.parse_spec(example("scale-to-zero.yaml"))
                                  .versions[0])["spec"]["replicas"]
        for phase in ("Idle", "Waking", "Ready")
    }  # fmt: skip
    assert counts == {"Idle": 0, "Waking": 1, "Ready": 1}


def test_only_versions_whose_floor_is_zero_scale_to_zero() -> None:
    raw = example("ab-canary.yaml")
    ctx = context(raw)
    assert coldstart.current(ctx, {}, NOW) == {}
    raw["versions"][0]["minReplicas"] = 0
    ctx = context(raw)
    states = coldstart.current(ctx, {}, NOW)
    assert list(states) == [raw["versions"][0]["name"]]
    assert states[raw["versions"][0]["name"]] == ColdState("Ready", NOW)  # new to it: idle from now


def test_the_status_says_a_version_is_idle_and_keeps_its_state_across_reconciliations() -> None:
    ctx = cold_context("Idle")
    cold = {"v1": ColdState("Idle", NOW, NOW - 900)}
    deployments = {"v1": {"metadata": {"generation": 2}, "status": {"observedGeneration": 2}}}
    router = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 2,
              "readyReplicas": 2, "updatedReplicas": 2}}  # fmt: skip
    status = fleet_status(
        shares=ctx.shares,
        deployments=deployments,
        services={"v1": "fleet-v1"},
        router=router,
        generation=1,
        endpoint="http://fleet.ml.svc",
        previous={},
        now="2026-01-01T00:00:00Z",
        cold=cold,
    ).manifest()
    (version,) = status["versions"]
    assert version["coldStart"] is True
    assert version["state"] == "Idle" and version["reason"] == "ScaledToZero"
    assert version["lastRequestAt"] == spec.iso(NOW - 900)
    assert status["phase"] == "Ready"  # at zero on purpose is not waiting for anything
    assert coldstart.current(ctx, status, NOW + 5)["v1"] == ColdState("Idle", NOW, NOW - 900)


@pytest.mark.parametrize("name", ["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-1g.10gb",
                                  "amd.com/gpu", "example.org/Accel_2"])  # fmt: skip
def test_gpu_resources_are_extended_resource_names(name: str) -> None:
    raw = example("scale-to-zero.yaml")
    raw["resources"] = {**raw["resources"], "gpuResource": name}
    ctx = context(raw)
    pod = runtime.pod_spec(ctx, ctx.spec.versions[0])
    resources = pod["containers"][0]["resources"]
    assert resources["requests"][name] == resources["limits"][name] == 1
    assert {"key": name, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


@pytest.mark.parametrize(
    "name",
    ["gpu", "kubernetes.io/gpu", "foo.kubernetes.io/gpu", "requests.nvidia.com/gpu", "nvidia.com/",
     "Nvidia.com/gpu", "nvidia.com/gpu/x", "nvidia.com/-gpu"],
)  # fmt: skip
def test_other_names_are_refused(name: str) -> None:
    raw = example("scale-to-zero.yaml")
    raw["resources"] = {**raw["resources"], "gpuResource": name}
    with pytest.raises(pydantic.ValidationError, match=r"gpuResource|gpu_resource"):
        spec.parse_spec(raw)


def test_the_routers_hold_as_router_cold_start_says() -> None:
    ctx = context(example("scale-to-zero.yaml"))
    (router,) = [
        m
        for m in builders.fleet(ctx)
        if m["kind"] == "Deployment" and m["metadata"]["name"] == "fleet-router"
    ]
    env = {e["name"]: e.get("value") for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CAPTIONFLEET_COLD_START_MAX_HELD"] == "100"
    assert env["CAPTIONFLEET_COLD_START_TIMEOUT_MS"] == "120000"  # timeout: 2m


def test_the_routers_deadline_is_router_request_timeout_longer_than_the_hold_in_the_example() -> None:
    def router_env(raw: dict[str, Any]) -> dict[str, Any]:
        (router,) = [
            m
            for m in builders.fleet(context(raw))
            if m["kind"] == "Deployment" and m["metadata"]["name"] == "fleet-router"
        ]
        return {e["name"]: e.get("value") for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}

    raw = example("scale-to-zero.yaml")
    assert router_env(raw)["CAPTIONFLEET_REQUEST_TIMEOUT_MS"] == "180000"  # requestTimeout: 3m
    del raw["router"]["requestTimeout"]
    assert router_env(raw)["CAPTIONFLEET_REQUEST_TIMEOUT_MS"] == "30000"  # the router's own default
    for bad in ("0s", "2h", "soon"):
        raw["router"]["requestTimeout"] = bad
        with pytest.raises(pydantic.ValidationError, match=r"requestTimeout|request_timeout"):
            spec.parse_spec(raw)


def _sleepers(parsed: spec.CaptionModelSpec, state: rollout.CanaryState) -> tuple[list[str], dict[str, int]]:
    """The versions that may scale to zero in ``state``, and every version's replica floor."""
    ctx = FleetContext.create(
        name="fleet", namespace="ml", uid="u", spec=parsed, config=CONFIG, rollout=state, canary_ready=True
    )
    floors = {share.name: replica_bounds(parsed, share)[0] for share in ctx.shares}
    return sorted(coldstart.current(ctx, {}, NOW)), floors


def test_a_canary_never_scales_to_zero_before_its_rollout_is_decided() -> None:
    """Idle, it would get no pods, so no traffic, so no figures (or gate run): a rollout stuck for good."""
    raw = example("ab-canary.yaml")
    raw["autoscaling"] = {**raw["autoscaling"], "minReplicas": 0}
    raw["versions"][2]["minReplicas"] = 0  # the canary's own floor too
    parsed = spec.parse_spec(raw)
    running = rollout.current(parsed, None)
    assert running is not None and running.phase == "Progressing"
    assert _sleepers(parsed, running) == (["base", "large"], {"base": 0, "large": 0, "base-next": 1})
    paused = running.model_copy(update={"phase": "Paused"})
    assert _sleepers(parsed, paused)[0] == ["base", "large"]
    # decided: the new stable may sleep again; the old one is retired
    promoted = running.model_copy(update={"phase": "Promoted", "drained": True})
    assert _sleepers(parsed, promoted)[0] == ["base-next", "large"]

    gated_spec = spec.parse_spec(raw | {"rollout": {"qualityGate": {"minScore": 0.5, "maxDrop": 0.1}}})
    gated = rollout.current(gated_spec, None)
    assert gated is not None and gated.awaits_gate
    assert _sleepers(gated_spec, gated)[0] == ["large"]  # the gate may score the stable: awake
