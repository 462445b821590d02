"""The operator's key (operator/operator_key.py): derived per CaptionModel, only its digest in the
runtimes' manifests, accepted by the real runtime key check next to the user's keys, and sent by the
quality gate; without a key, a gate with spec.auth does not run (NoOperatorKey)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from captionfleet import evalsets
from captionfleet.operator import builders, gate_run, spec
from captionfleet.operator.builders.common import ClusterConfig, FleetContext
from captionfleet.operator.builders.env import router_env, runtime_env
from captionfleet.operator.operator_key import OperatorKey, OperatorKeyError
from captionfleet.operator.settings import OperatorSettings
from captionfleet.runtime.web.errors import Unauthorized
from captionfleet.runtime.web.keys import KeyGuard
from captionfleet.settings import add_options, env_name, from_args
from captionfleet.settings.serve import ServeSettings

from .conftest import caption_peer

MASTER = "m" * 20 + "-the-operator's-master-secret"
KEY = OperatorKey(MASTER.encode())
CONFIG = ClusterConfig(OperatorSettings(default_runtime_image="registry.test/runtime:1"), KEY)
USER_KEY = "the-users-own-key"
NOW = "2024-01-01T00:00:00Z"
AUTH = {"secretName": "fleet-keys"}
GATED: dict[str, Any] = {
    "versions": [
        {"name": "v1", "model": "file:///m1", "weight": 90},
        {"name": "v2", "model": "file:///m2", "weight": 10, "canary": True},
    ],
    "rollout": {"qualityGate": {"minScore": 0.5}},
    "auth": AUTH,
}


def context(raw: dict[str, Any], config: ClusterConfig = CONFIG, name: str = "fleet") -> FleetContext:
    return FleetContext.create(name=name, namespace="ml", uid="uid", spec=spec.parse_spec(raw), config=config)


def test_each_captionmodel_gets_its_own_key_an_hmac_of_its_namespace_and_name() -> None:
    expected = hmac.new(MASTER.encode(), b"ml/fleet", hashlib.sha256).hexdigest()
    assert KEY.key_for("ml", "fleet") == expected
    assert len({KEY.key_for("ml", "fleet"), KEY.key_for("ml", "other"), KEY.key_for("ml2", "fleet")}) == 3
    assert KEY.digest_for("ml", "fleet") == "sha256:" + hashlib.sha256(expected.encode()).hexdigest()
    assert MASTER not in repr(KEY) and MASTER not in repr(CONFIG)


def test_the_key_file_is_read_stripped_and_refused_when_short_or_missing(tmp_path: Path) -> None:
    assert OperatorKey.load("") is None
    good = tmp_path / "key"
    good.write_text(f"  {MASTER}\n")
    assert OperatorKey.load(str(good)) == KEY
    short = tmp_path / "short"
    short.write_text("too-short\n")
    with pytest.raises(OperatorKeyError, match="holds 9 characters; at least 32"):
        OperatorKey.load(str(short))
    with pytest.raises(OperatorKeyError, match="cannot read the operator key file"):
        OperatorKey.load(str(tmp_path / "absent"))
    settings = OperatorSettings(operator_key_file=str(good))
    assert ClusterConfig.from_settings(settings).operator_key == KEY
    assert ClusterConfig.from_settings(OperatorSettings()).operator_key is None


def _env(entries: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in entries}


def test_only_the_runtimes_of_a_fleet_with_auth_get_the_digest_and_no_manifest_holds_the_key() -> None:
    api_keys = env_name("api_keys")
    with_auth = context(GATED)
    for version in with_auth.spec.versions:
        assert _env(runtime_env(with_auth, version))[api_keys] == KEY.digest_for("ml", "fleet")
    assert api_keys not in _env(router_env(with_auth))  # a way to the pods, never in through the router
    manifests = json.dumps(builders.fleet(with_auth))
    assert KEY.key_for("ml", "fleet") not in manifests and MASTER not in manifests
    assert manifests.count(KEY.digest_for("ml", "fleet")) == 2  # the two runtime Deployments

    without_auth = context({k: v for k, v in GATED.items() if k != "auth"})
    assert f'"{api_keys}"' not in json.dumps(builders.fleet(without_auth))
    no_key = context(GATED, replace(CONFIG, operator_key=None))
    assert f'"{api_keys}"' not in json.dumps(builders.fleet(no_key))


def _serve_settings(entries: list[dict[str, Any]], keys_file: Path, monkeypatch: Any) -> ServeSettings:
    """The runtime's settings as its container's environment gives them (the keys file moved here)."""
    for name, value in _env(entries).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(env_name("api_keys_file"), str(keys_file))
    parser = argparse.ArgumentParser()
    add_options(parser, ServeSettings)
    return from_args(ServeSettings, parser.parse_args([]))


def test_the_runtime_takes_the_operator_key_and_the_users_keys_file_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"sha256:{hashlib.sha256(USER_KEY.encode()).hexdigest()}\n")
    ctx = context(GATED)
    settings = _serve_settings(runtime_env(ctx, ctx.spec.versions[0]), keys_file, monkeypatch)
    guard = KeyGuard.from_settings(settings)
    assert guard.authenticate(USER_KEY, "10.0.0.1") != guard.authenticate(
        KEY.key_for("ml", "fleet"), "10.0.0.2"
    )
    for wrong in (KEY.key_for("ml", "another-fleet"), KEY.digest_for("ml", "fleet"), MASTER):
        with pytest.raises(Unauthorized):
            guard.authenticate(wrong, "10.0.0.3")


async def _keyed_runtime(guard: KeyGuard, captions: dict[bytes, str], seen: list[str]) -> web.AppRunner:
    """A runtime-shaped peer with the real key check: 401 without a key it knows, else the caption."""

    async def caption(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-API-Key", ""))
        try:
            guard.authenticate(request.headers.get("X-API-Key"), request.remote)
        except Unauthorized as exc:
            return web.json_response({"error": {"code": "unauthorized", "message": str(exc)}}, status=401)
        return web.json_response({"caption": captions.get(await request.read(), "something else")})

    return await caption_peer(caption)


async def _gate_run(clients_key: OperatorKey | None, guard: KeyGuard, seen: list[str]) -> Any:
    images = evalsets.builtin_scenes()
    right = {item.image: item.references[0] for item in images}
    runner = await _keyed_runtime(guard, right, seen)

    async def pods(namespace: str, service: str) -> list[str]:
        return [f"http://127.0.0.1:{runner.addresses[0][1]}"]

    body = {"metadata": {"namespace": "ml", "name": "fleet"}}
    try:
        async with aiohttp.ClientSession() as http:
            clients = gate_run.GateClients(http, pods, clients_key)
            return await gate_run.run(clients, None, body, spec.parse_spec(GATED), NOW)  # type: ignore[arg-type]
    finally:
        await runner.cleanup()


def _guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeyGuard:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"{USER_KEY}\n")
    ctx = context(GATED)
    return KeyGuard.from_settings(
        _serve_settings(runtime_env(ctx, ctx.spec.versions[1]), keys_file, monkeypatch)
    )


async def test_the_gate_captions_through_pods_with_auth_with_the_operator_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    outcome = await _gate_run(KEY, _guard(tmp_path, monkeypatch), seen)
    assert outcome is not None and outcome.verdict == "passed", outcome
    assert outcome.gate.canary_score == 1.0 and seen == [KEY.key_for("ml", "fleet")] * 40
    assert KEY.key_for("ml", "fleet") not in outcome.message + outcome.gate.model_dump_json()


async def test_without_an_operator_key_a_gate_with_auth_sends_nothing_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    outcome = await _gate_run(None, _guard(tmp_path, monkeypatch), seen)
    assert outcome is not None and outcome.verdict == "error" and seen == []
    assert (outcome.gate.phase, outcome.gate.condition_reason()) == ("Error", "NoOperatorKey")
    assert "spec.auth is set and the operator has no key" in outcome.message
    assert "--operator-key-file" in outcome.message


async def test_a_pod_that_does_not_take_the_key_yet_is_no_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod started before its Deployment had the digest: 401, no verdict, the next check retries."""
    seen: list[str] = []
    stale = KeyGuard.from_settings(ServeSettings(api_keys=(USER_KEY,)))
    outcome = await _gate_run(KEY, stale, seen)
    assert outcome is not None and outcome.verdict == "error", outcome
    assert "does not take the operator's key yet" in outcome.message and len(seen) <= gate_run.CONCURRENCY


def test_the_operator_will_not_start_with_an_unusable_key_file(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too-short\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
    argv = [sys.executable, "-m", "captionfleet", "operator", "--operator-key-file", str(short)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"captionfleet operator: the operator key file {short} holds 9 characters; at least 32 are needed "
        "(e.g. `openssl rand -hex 32`)"
    )
