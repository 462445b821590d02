"""Logging in like kubectl: in-cluster first, else $KUBECONFIG, else ~/.kube/config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes.config.incluster_config as incluster
import pytest

from captionfleet.operator import kube
from captionfleet.operator.handlers import connection_info


@pytest.fixture
def kubeconfig(write_kubeconfig: Callable[..., Path]) -> Callable[[Path, str, str], Path]:
    """A kubeconfig of two contexts: ``main`` (current) and ``other`` (namespace x)."""
    return lambda path, server, token: write_kubeconfig(path, server, token, {"main": None, "other": "x"})


@pytest.fixture
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return tmp_path


def test_kubeconfig_from_the_environment_read_at_call_time(
    outside_a_cluster: Path, kubeconfig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = kubeconfig(outside_a_cluster / "cfg", "https://api.example:6443", "s3cret")
    monkeypatch.setenv("KUBECONFIG", str(path))
    configuration = kube.load_configuration()
    assert configuration.host == "https://api.example:6443"
    info = connection_info(kube.credentials(configuration))
    assert (info.server, info.scheme, info.token) == ("https://api.example:6443", "Bearer", "s3cret")


def test_home_kubeconfig_when_nothing_else(outside_a_cluster: Path, kubeconfig: Any) -> None:
    (outside_a_cluster / ".kube").mkdir()
    kubeconfig(outside_a_cluster / ".kube" / "config", "https://home.example", "t")
    assert kube.load_configuration().host == "https://home.example"


def test_an_explicit_kubeconfig_and_context_win(
    outside_a_cluster: Path, kubeconfig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(outside_a_cluster / "env", "https://env.example", "t")))
    explicit = kubeconfig(outside_a_cluster / "explicit", "https://explicit.example", "t")
    assert kube.load_configuration(str(explicit), "other").host == "https://explicit.example"


def test_in_cluster_service_account_first(
    outside_a_cluster: Path, kubeconfig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(outside_a_cluster / "env", "https://env.example", "t")))
    token, ca = outside_a_cluster / "token", outside_a_cluster / "ca.crt"
    token.write_text("pod-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    configuration = kube.load_configuration()
    assert configuration.host == "https://10.0.0.1:443"
    assert connection_info(kube.credentials(configuration)).token == "pod-token"


def test_no_credentials_is_a_clear_error(outside_a_cluster: Path) -> None:
    with pytest.raises(kube.KubeError, match="cannot log in: not in a cluster, and kubeconfig"):
        kube.load_configuration()
