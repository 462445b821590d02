"""The routes file: applied at start, reloaded on change, a bad version of it leaves the last good table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from captionfleet.runtime.router.app import build_app
from captionfleet.runtime.router.sources import TableHolder
from captionfleet.runtime.router.table import TableError
from captionfleet.settings.router import RouterSettings


def routes(v1: str, v2: str, canary_weight: int) -> str:
    return json.dumps(
        {
            "versions": [
                {"name": "v1", "weight": 100 - canary_weight, "role": "stable", "endpoints": [v1]},
                {"name": "v2", "weight": canary_weight, "role": "canary", "endpoints": [v2]},
            ]
        }
    )


async def _router_on_a_routes_file(
    tmp_path: Path, start_runtime: Any, start_router: Any
) -> tuple[Any, Any, Path, Any]:
    """Two fake runtimes, a routes file sending everything to v1, and a router polling the file."""
    v1, v2 = await start_runtime("v1"), await start_runtime("v2")
    path = tmp_path / "routes.json"
    path.write_text(routes(v1.url, v2.url, 0))
    return v1, v2, path, await start_router(routes_file=str(path), routes_file_poll_ms=20)


async def test_the_routes_file_is_reloaded_on_change(
    tmp_path: Path, start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1, v2, path, router = await _router_on_a_routes_file(tmp_path, start_runtime, start_router)
    body = await (await router.caption()).json()
    assert body["model_version"] == "v1"

    async def canary_weight_is(weight: int) -> bool:
        _, models = await router.get_json("/v1/models")
        return bool(models["models"][1]["weight"] == weight)

    path.write_text(routes(v1.url, v2.url, 100))
    await eventually(lambda: canary_weight_is(100), what="the new file")
    assert (await (await router.caption()).json())["model_version"] == "v2"

    # A broken file is reported and ignored; the last good table keeps routing.
    path.write_text("versions: [{name: v1, weight: 30}]")

    async def error_reported(text: str) -> bool:
        _, models = await router.get_json("/v1/models")
        return text in (models["router"]["last_error"] or "")

    await eventually(lambda: error_reported("sum to 100"), what="the bad file's error")
    assert (await (await router.caption()).json())["model_version"] == "v2"
    path.unlink()
    await eventually(lambda: error_reported("No such file"), what="the missing file's error")
    assert (await (await router.caption()).json())["model_version"] == "v2"
    path.write_text(routes(v1.url, v2.url, 100))  # the good content again

    async def error_cleared() -> bool:
        _, models = await router.get_json("/v1/models")
        return models["router"]["last_error"] is None

    await eventually(error_cleared, what="the error to clear")


async def test_failed_reads_of_the_routes_file_are_counted_in_the_metrics(
    tmp_path: Path, start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1, _, path, router = await _router_on_a_routes_file(tmp_path, start_runtime, start_router)
    errors = "captionfleet_router_table_source_errors_total"
    assert (await router.scrape())[errors] == 0
    path.write_text("versions: [{name: v1, weight: 30}]")  # weights that do not sum to 100

    async def counted() -> bool:
        return (await router.scrape())[errors] >= 1

    await eventually(counted, what="the bad file counted in /metrics")
    path.write_text(routes(v1.url, "http://127.0.0.1:99999", 100))  # a port out of range
    failed_so_far = (await router.scrape())[errors]

    async def counted_again() -> bool:
        return (await router.scrape())[errors] > failed_so_far

    await eventually(counted_again, what="the bad endpoint counted in /metrics")
    assert (await router.caption()).status == 200  # the last good table still routes


async def test_a_routes_file_with_a_bad_endpoint_keeps_the_last_good_table(
    tmp_path: Path, start_runtime: Any, start_router: Any, eventually: Any
) -> None:
    v1, _, path, router = await _router_on_a_routes_file(tmp_path, start_runtime, start_router)
    assert (await router.caption()).status == 200
    holder = router.holder
    errors_before = holder.source_errors
    # A port that is not a number: accepted by the old check, then every request was a 500.
    path.write_text(routes(v1.url, "http://127.0.0.1:abc", 100))

    await eventually(lambda: _last_error_has(router, "http://127.0.0.1:abc"), what="the bad endpoint's error")
    _, models = await router.get_json("/v1/models")
    assert "(v2)" in models["router"]["last_error"]  # names the version, then the endpoint
    assert holder.source_errors > errors_before
    assert [m["weight"] for m in models["models"]] == [100, 0]  # the last good table still routes
    for _ in range(3):
        response = await router.caption()
        assert response.status == 200 and (await response.json())["model_version"] == "v1"
    assert (await router.get_json("/readyz"))[0] == 200

    path.write_text(routes(v1.url, "http://127.0.0.1:99999", 100))
    await eventually(lambda: _last_error_has(router, "out of range"), what="the port out of range")
    assert (await (await router.caption()).json())["model_version"] == "v1"


async def _last_error_has(router: Any, text: str) -> bool:
    _, models = await router.get_json("/v1/models")
    return text in (models["router"]["last_error"] or "")


def test_a_bad_source_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("versions: {}")
    with pytest.raises(TableError, match="a list under 'versions'"):
        build_app(RouterSettings(routes_file=str(path)), holder=TableHolder())
    with pytest.raises(FileNotFoundError):
        build_app(RouterSettings(routes_file=str(tmp_path / "missing.yaml")), holder=TableHolder())
    with pytest.raises(TableError, match="sum to 100"):
        build_app(RouterSettings(routes=("v1=http://a:1", "v2=http://b:1"), weights=("v1=50",)))
    with pytest.raises(TableError, match=r"version v2: endpoint 'http://b:99999'"):
        build_app(RouterSettings(routes=("v1=http://a:1", "v2=http://b:99999")), holder=TableHolder())
    path.write_text('versions: [{name: v1, weight: 100, endpoints: ["http://127.0.0.1:abc"]}]')
    with pytest.raises(TableError, match=r"\(v1\): endpoint 'http://127.0.0.1:abc'"):
        build_app(RouterSettings(routes_file=str(path)), holder=TableHolder())


def test_settings_check() -> None:
    assert RouterSettings(caption_model="captions").check() == []
    assert "exactly one source" in RouterSettings().check()[0]
    assert "exactly one source" in RouterSettings(caption_model="c", routes=("v1=http://a:1",)).check()[0]
    problems = RouterSettings(
        routes_file="r.yaml", weights=("v1=100",), request_timeout_ms=0, port=70000, max_body_bytes=0
    ).check()
    assert any("weights apply to routes" in p for p in problems)
    assert any("request_timeout_ms must be > 0" in p for p in problems)
    assert any("port must be" in p for p in problems)
    assert any("max_body_bytes must be > 0" in p for p in problems)
