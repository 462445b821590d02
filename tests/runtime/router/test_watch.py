"""The table from the cluster: the CaptionModel's status and the versions' EndpointSlices, watched
through a Kubernetes API (kmock's emulator) by the real router app."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from captionfleet.names import captionmodels_path, endpoints_by_service, slice_endpoints
from captionfleet.runtime.router.kube import (
    KubeAccess,
    KubeApi,
    KubeConfigError,
    Reflector,
    in_cluster_access,
    kubeconfig_access,
)
from captionfleet.runtime.router.watch import endpointslices_path, table_from_status

NS = "fleet"
NAME = "captions"
MODELS = captionmodels_path(NS)
SLICES = endpointslices_path(NS)


def caption_model(versions: list[dict[str, Any]], name: str = NAME) -> dict[str, Any]:
    return {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "versions": [{"name": v["name"], "model": "org/blip", "weight": v["weight"]} for v in versions]
        },
        "status": {"versions": versions},
    }


def endpoint_slice(service: str, url: str, *, ready: bool = True) -> dict[str, Any]:
    """An EndpointSlice of ``service`` with one loopback endpoint (http://127.0.0.1:port). Pods on
    loopback differ by port, and a slice has one port list, so each gets its own slice, as Kubernetes
    does for pods whose named port differs."""
    address, port = url.split("//")[1].rsplit(":", 1)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{port}",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": int(port), "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": ready}}],
    }


def test_slice_endpoints() -> None:
    slice_ = {
        "metadata": {"labels": {"kubernetes.io/service-name": "s"}},
        "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"]},  # ready unset counts as ready
            {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": True, "terminating": True}},
            {"addresses": ["fd00::5"], "conditions": {"ready": True}},
        ],
    }
    assert slice_endpoints(slice_) == [
        "http://10.0.0.1:8080",
        "http://10.0.0.2:8080",
        "http://[fd00::5]:8080",
    ]
    no_http = [{"name": "metrics", "port": 9090}, {"name": "x", "port": 1}]
    assert slice_endpoints({**slice_, "ports": no_http}) == []
    other = {**slice_, "metadata": {"labels": {"kubernetes.io/service-name": "t"}}, "endpoints": []}
    assert endpoints_by_service([slice_, other, {"metadata": {}}]) == {
        "s": ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://[fd00::5]:8080"],
        "t": [],
    }


def test_table_from_status() -> None:
    model = caption_model(
        [
            {"name": "v1", "role": "stable", "weight": 80, "service": "captions-v1", "readyReplicas": 2},
            {"name": "v2", "role": "canary", "weight": 20, "service": "captions-v2", "readyReplicas": 0},
            {"name": "v3", "role": "variant", "weight": 0, "readyReplicas": 1},
        ]
    )
    # EndpointSlices unknown: the Services' DNS names, for versions with ready replicas.
    table = table_from_status(model, None, namespace=NS, service_port=8080)
    assert [(v.name, v.role, v.weight, v.endpoints) for v in table.versions] == [
        ("v1", "stable", 80, ("http://captions-v1.fleet.svc:8080",)),
        ("v2", "canary", 20, ()),
        ("v3", "variant", 0, ("http://captions-v3.fleet.svc:8080",)),
    ]
    assert table.source == "CaptionModel fleet/captions"
    # EndpointSlices known: the pods; a Service without slices still goes through its DNS name.
    pods = {"captions-v2": ["http://10.0.0.9:8080"]}
    table = table_from_status(model, pods, namespace=NS, service_port=8080)
    assert table.version("v2").endpoints == ("http://10.0.0.9:8080",)  # type: ignore[union-attr]
    assert table.version("v1").endpoints == ("http://captions-v1.fleet.svc:8080",)  # type: ignore[union-attr]
    # No roles in the status: the operator's rule, with status.canaryVersion.
    bare = caption_model([{"name": "a", "weight": 90}, {"name": "b", "weight": 10}])
    bare["status"]["canaryVersion"] = "b"
    assert [v.role for v in table_from_status(bare, {}, namespace=NS, service_port=80).versions] == [
        "stable",
        "canary",
    ]
    assert not table_from_status(None, None, namespace=NS, service_port=8080).versions
    assert not table_from_status({"metadata": {"name": NAME}}, None, namespace=NS, service_port=8080).versions


def test_credentials(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="not in a pod"):
        in_cluster_access(tmp_path, {})
    (tmp_path / "token").write_text("tok-1\n")
    (tmp_path / "namespace").write_text("fleet\n")
    (tmp_path / "ca.crt").write_text("")
    with pytest.raises(Exception):  # noqa: B017  (an empty CA file is not a CA: refused by ssl)
        in_cluster_access(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    config = tmp_path / "config"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "tok-2"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
                "current-context": "x",
            }
        )
    )
    access = kubeconfig_access(str(config))
    assert access.server == "http://127.0.0.1:6443" and access.namespace == "team"
    assert access.headers() == {"Authorization": "Bearer tok-2"}
    with pytest.raises(KubeConfigError, match="cannot load the kubeconfig"):
        kubeconfig_access(str(tmp_path / "missing"))


@pytest.fixture
def kubeconfig(kmock: Any, tmp_path: Path) -> str:
    kmock.resources["captionfleet.io/v1alpha1/captionmodels"].kind = "CaptionModel"
    kmock.resources["discovery.k8s.io/v1/endpointslices"].kind = "EndpointSlice"
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "reader", "user": {}}],
                "contexts": [
                    {"name": "kmock", "context": {"cluster": "kmock", "user": "reader", "namespace": NS}}
                ],
                "current-context": "kmock",
            }
        )
    )
    return str(path)


async def test_status_changes_reach_the_router_within_seconds(
    kmock: Any, kubeconfig: str, start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1a, v1b, v2 = await start_runtime("v1"), await start_runtime("v1"), await start_runtime("v2")
    # Another CaptionModel in the namespace is not ours, whatever the API server sends.
    await kmock.post(MODELS, json=caption_model([{"name": "x", "weight": 100}], name="other"))
    for service, runtime in (("captions-v1", v1a), ("captions-v1", v1b), ("captions-v2", v2)):
        await kmock.post(SLICES, json=endpoint_slice(service, runtime.url))
    router = await start_router(caption_model=NAME, kubeconfig=kubeconfig)  # namespace from the context

    # No CaptionModel yet: not ready, no route.
    status, _ = await router.get_json("/readyz")
    assert status == 503
    assert (await router.caption()).status == 503

    stable = {"name": "v1", "role": "stable", "weight": 100, "service": "captions-v1", "readyReplicas": 2}
    canary = {"name": "v2", "role": "canary", "weight": 0, "service": "captions-v2", "readyReplicas": 1}
    await kmock.post(MODELS, json=caption_model([stable, canary]))

    async def weights() -> dict[str, int]:
        _, body = await router.get_json("/v1/models")
        return {m["version"]: m["weight"] for m in body["models"] if m["ready"]}

    async def weights_are(expected: dict[str, int]) -> bool:
        return await weights() == expected

    await eventually(lambda: weights_are({"v1": 100}), what="the CaptionModel's table")
    for _ in range(4):
        assert (await router.caption()).status == 200
    assert len(v1a.received) == len(v1b.received) == 2  # both pods of the EndpointSlice take turns

    # The operator shifts weight (a rollout step); then rolls back.
    shifted = [{**stable, "weight": 70}, {**canary, "weight": 30}]
    await kmock.patch(f"{MODELS}/{NAME}/status", json={"status": {"versions": shifted}})
    await eventually(lambda: weights_are({"v1": 70, "v2": 30}), what="the rollout step")
    users = {f"user-{i}": None for i in range(60)}
    for user in users:
        response = await router.caption(headers={"X-User-Id": user, "Content-Type": "image/png"})
        assert response.status == 200
    assert v2.received, "the canary receives traffic"

    rolled_back = [stable, {**canary, "weight": 0}]
    await kmock.patch(f"{MODELS}/{NAME}/status", json={"status": {"versions": rolled_back}})
    await eventually(lambda: weights_are({"v1": 100}), what="the rollback")
    before = len(v2.received)
    for user in users:
        body = await (await router.caption(headers={"X-User-Id": user, "Content-Type": "image/png"})).json()
        assert body["model_version"] == "v1"
    assert len(v2.received) == before

    # A pod stops being ready: its EndpointSlice says so, and it takes no more requests.
    not_ready = endpoint_slice("captions-v1", v1b.url, ready=False)
    await kmock.patch(f"{SLICES}/{not_ready['metadata']['name']}", json=not_ready)

    async def one_endpoint() -> bool:
        _, body = await router.get_json("/v1/models")
        return body["models"][0]["endpoints"] == 1

    await eventually(one_endpoint, what="the EndpointSlice change")
    served_by_b = len(v1b.received)
    for _ in range(3):
        assert (await router.caption()).status == 200
    assert len(v1b.received) == served_by_b

    # The CaptionModel is deleted: nothing to route.
    await kmock.delete(f"{MODELS}/{NAME}")

    async def not_ready() -> bool:
        status, _ = await router.get_json("/readyz")
        return status == 503

    await eventually(not_ready, what="the deletion")


async def test_the_reflector_lists_again_after_failures_and_gone_watches(eventually: Any) -> None:
    """A scripted API server: the first list fails (500), the watch sends one change and then 410 Gone,
    the next list has the newest state, and that watch ends normally (resumed from the last version)."""
    lists: list[str] = []
    watches: list[dict[str, str]] = []

    async def collection(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            lists.append(request.query.get("fieldSelector", ""))
            if len(lists) == 1:
                return web.json_response({"kind": "Status", "code": 500, "message": "restarting"}, status=500)
            items = [{"metadata": {"name": "a", "resourceVersion": "5"}, "n": len(lists)}]
            return web.json_response({"metadata": {"resourceVersion": str(10 * len(lists))}, "items": items})
        watches.append(dict(request.query))
        response = web.StreamResponse()
        await response.prepare(request)
        if len(watches) == 1:
            events = [
                {"type": "MODIFIED", "object": {"metadata": {"name": "a", "resourceVersion": "21"}, "n": 99}},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "22"}}},
                {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}},
            ]
        elif len(watches) == 2:
            events = [{"type": "ADDED", "object": {"metadata": {"name": "b", "resourceVersion": "31"}}}]
        elif len(watches) == 3:
            events = [{"type": "DELETED", "object": {"metadata": {"name": "a", "resourceVersion": "32"}}}]
        else:
            await asyncio.Event().wait()  # hold the stream open, like a quiet API server
        for event in events:
            await response.write(json.dumps(event).encode() + b"\n")
        return response

    app = web.Application()
    app.router.add_get("/things", collection)
    seen: list[dict[str, Any]] = []
    errors: list[str] = []
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        api = KubeApi(KubeAccess(str(server.make_url("")).rstrip("/")), session)
        reflector = Reflector(
            api,
            "/things",
            params={"fieldSelector": "metadata.name=a"},
            on_change=seen.append,
            on_error=errors.append,
            backoff_s=(0.01, 0.05),
        )
        task = asyncio.create_task(reflector.run())
        try:

            async def settled() -> bool:
                return len(watches) >= 4

            await eventually(settled, what="list, watch, 410, list, watch, resumed watch")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert len(errors) == 1 and "HTTP 500" in errors[0]
    assert lists == ["metadata.name=a"] * 3
    assert watches[0]["resourceVersion"] == "20" and watches[0]["allowWatchBookmarks"] == "true"
    assert watches[1]["resourceVersion"] == "30"  # a fresh list after 410 Gone
    assert watches[2]["resourceVersion"] == "31"  # resumed from the last event's version
    assert watches[3]["resourceVersion"] == "32"
    assert [sorted(objects) for objects in seen] == [["a"], ["a"], ["a"], ["a", "b"], ["b"]]
    assert seen[1]["a"]["n"] == 99 and seen[2]["a"]["n"] == 3
