"""Why a fleet's pods do not start, read from the pods themselves: one pure mapping, no API calls.

The kubelet and the scheduler say it in the pod's status: a container waiting with
``CreateContainerConfigError`` (a Secret or key named by an env var's ``secretKeyRef`` does not exist),
``ErrImagePull``/``ImagePullBackOff``, a container (the model download included) in
``CrashLoopBackOff``, or ``PodScheduled=False`` with reason ``Unschedulable``. A Secret *volume* that
cannot be mounted leaves the pod only ``ContainerCreating``: the kubelet says why in ``FailedMount``
Events on the pod, whose messages are passed in. No Secret is ever read: which one is missing comes
from these messages, and which field of the spec named it from ``secret_uses``.

Each problem has a stable ``subject`` (what is wrong: "Secret redis not found") and a ``detail`` that
may change from one retry to the next (the registry's answer), so that a Warning Event is posted once
per subject, not at every retry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from captionfleet.names import COMPONENT_LABEL, VERSION_LABEL
from captionfleet.operator.events import Reason
from captionfleet.operator.spec import CaptionModelSpec

SECRET_MISSING = Reason.SECRET_MISSING
IMAGE_PULL_FAILED = Reason.IMAGE_PULL_FAILED
UNSCHEDULABLE = Reason.UNSCHEDULABLE
CONTAINER_FAILING = Reason.CONTAINER_FAILING
MODEL_DOWNLOAD_FAILING = Reason.MODEL_DOWNLOAD_FAILING
CONTAINER_CONFIG_ERROR = Reason.CONTAINER_CONFIG_ERROR
VOLUME_MOUNT_FAILED = Reason.VOLUME_MOUNT_FAILED
# Most telling first: when a fleet has several, the conditions' reason is the first of these found
# (the same reasons as events.POD_PROBLEMS, in order).
POD_REASONS = (
    SECRET_MISSING,
    CONTAINER_CONFIG_ERROR,
    VOLUME_MOUNT_FAILED,
    IMAGE_PULL_FAILED,
    MODEL_DOWNLOAD_FAILING,
    CONTAINER_FAILING,
    UNSCHEDULABLE,
)
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
MODEL_DOWNLOAD_CONTAINER = "fetch-model"  # the init container of hf:// models (builders/runtime.py)
SUMMARY_MOUNT_MESSAGE = "Unable to attach or mount volumes"
ROUTER_KEY = "router"  # the key of the router's pods (no version is named router)

# The kubelet's own words (pkg/kubelet: makeEnvironmentVariables, the secret volume plugin).
_SECRET_NOT_FOUND = re.compile(r'secrets? "(?P<name>[^"]+)" not found')
_KEY_NOT_FOUND = re.compile(r"couldn't find key (?P<key>\S+) in Secret (?P<namespace>[^/\s]+)/(?P<name>\S+)")
_VOLUME = re.compile(r'for volume "(?P<volume>[^"]+)"')
_VOLUME_KEY_NOT_FOUND = re.compile(r"references non-existent secret key: (?P<key>\S+)")


@dataclass(frozen=True)
class SecretUse:
    """Where the pods use a Secret: the spec field that names it, and the key they read."""

    name: str
    key: str
    field: str
    volume: str | None = None  # the pod volume it is mounted as, if any


@dataclass(frozen=True, order=True)
class PodProblem:
    reason: Reason  # one of POD_REASONS
    subject: str  # what is wrong, stable across retries
    detail: str = ""  # what the kubelet or scheduler said this time

    @property
    def message(self) -> str:
        return f"{self.subject}: {self.detail}" if self.detail else self.subject


def secret_uses(spec: CaptionModelSpec) -> list[SecretUse]:
    """The Secrets the fleet's pods need, by the spec field that names them."""
    uses = []
    if spec.auth is not None:
        uses.append(SecretUse(spec.auth.secret_name, spec.auth.key, "auth.secretName", volume="auth"))
    if spec.cache is not None and spec.cache.redis_url_secret is not None:
        ref = spec.cache.redis_url_secret
        uses.append(SecretUse(ref.name, ref.key, "cache.redisUrlSecret"))
    return uses


def _field_of(name: str, uses: Sequence[SecretUse]) -> str:
    fields = [use.field for use in uses if use.name == name]
    return f" ({', '.join(fields)})" if fields else ""


def _secret_problem(message: str, uses: Sequence[SecretUse]) -> PodProblem | None:
    """A missing Secret or key, from the kubelet's message, named with the field that refers to it."""
    if match := _KEY_NOT_FOUND.search(message):
        name, key = match["name"], match["key"]
        return PodProblem(SECRET_MISSING, f"Secret {name} has no key {key}{_field_of(name, uses)}")
    if match := _SECRET_NOT_FOUND.search(message):
        name = match["name"]
        keys = sorted({use.key for use in uses if use.name == name})
        wanted = f" (key {', '.join(keys)})" if keys else ""
        return PodProblem(SECRET_MISSING, f"Secret {name} not found{_field_of(name, uses)}{wanted}")
    volume = _VOLUME.search(message)
    if (missing := _VOLUME_KEY_NOT_FOUND.search(message)) and volume:
        use = next((u for u in uses if u.volume == volume["volume"]), None)
        name = use.name if use else f"of volume {volume['volume']}"
        field = f" ({use.field})" if use else ""
        return PodProblem(SECRET_MISSING, f"Secret {name} has no key {missing['key']}{field}")
    return None


def _crash_problem(status: Mapping[str, Any]) -> PodProblem:
    name = status.get("name")
    terminated = (status.get("lastState") or {}).get("terminated") or {}
    reason = MODEL_DOWNLOAD_FAILING if name == MODEL_DOWNLOAD_CONTAINER else CONTAINER_FAILING
    code = terminated.get("exitCode")
    detail = str(terminated.get("message") or terminated.get("reason") or "").strip()
    exit_text = f" (exit code {code})" if code is not None else ""
    return PodProblem(reason, f"container {name} keeps failing{exit_text}", detail)


def container_problem(status: Mapping[str, Any], uses: Sequence[SecretUse] = ()) -> PodProblem | None:
    """What keeps one container (a ``containerStatuses[]`` entry) from running, if anything does."""
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason, message = waiting.get("reason"), str(waiting.get("message") or "")
    if reason == "CreateContainerConfigError":
        found = _secret_problem(message, uses)
        return found or PodProblem(CONTAINER_CONFIG_ERROR, f"container {status.get('name')}", message)
    if reason in IMAGE_PULL_REASONS:
        # ImagePullBackOff's message only says it waits: the registry's answer comes with ErrImagePull.
        detail = message if reason != "ImagePullBackOff" else ""
        return PodProblem(IMAGE_PULL_FAILED, f"image {status.get('image')} cannot be pulled", detail)
    if reason == "CrashLoopBackOff":
        return _crash_problem(status)
    return None


def _mount_problem(message: str, uses: Sequence[SecretUse]) -> PodProblem:
    found = _secret_problem(message, uses)
    if found is not None:
        return found
    volume = _VOLUME.search(message)
    subject = f"volume {volume['volume']} cannot be mounted" if volume else "a volume cannot be mounted"
    return PodProblem(VOLUME_MOUNT_FAILED, subject, message)


def _is_ready(status: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _started(status: Mapping[str, Any]) -> bool:
    """Whether any container got past creating (so its volumes were mounted)."""
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    return any({"running", "terminated"} & set(c.get("state") or {}) for c in containers) or any(
        (c.get("lastState") or {}).get("terminated") for c in containers
    )


def pod_problems(
    pod: Mapping[str, Any], mount_failures: Sequence[str] = (), uses: Sequence[SecretUse] = ()
) -> list[PodProblem]:
    """What keeps one pod from being ready; ``mount_failures`` are its FailedMount Events' messages."""
    status = pod.get("status") or {}
    if _is_ready(status) or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return []
    problems = []
    for condition in status.get("conditions") or []:
        unschedulable = condition.get("reason") == "Unschedulable" and condition.get("status") == "False"
        if condition.get("type") == "PodScheduled" and unschedulable:
            problems.append(
                PodProblem(UNSCHEDULABLE, "pods cannot be scheduled", condition.get("message", ""))
            )
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    problems += [p for p in (container_problem(c, uses) for c in containers) if p is not None]
    if not _started(status):
        problems += [_mount_problem(message, uses) for message in mount_failures]
    return problems


def _key(pod: Mapping[str, Any]) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(COMPONENT_LABEL) == ROUTER_KEY:
        return ROUTER_KEY
    return labels.get(VERSION_LABEL)


def problems_by_version(
    pods: Sequence[Mapping[str, Any]],
    mount_failures: Mapping[str, Sequence[str]] | None = None,
    uses: Sequence[SecretUse] = (),
) -> dict[str, list[PodProblem]]:
    """Each version's problems (the router's under ``ROUTER_KEY``), once each, most telling first.

    ``mount_failures`` maps a pod's name to its FailedMount messages. Of problems with the same
    subject, the one with the longest detail is kept (pods retrying at different moments)."""
    found: dict[str, dict[tuple[str, str], PodProblem]] = {}
    for pod in pods:
        key = _key(pod)
        if key is None:
            continue
        name = (pod.get("metadata") or {}).get("name", "")
        for problem in pod_problems(pod, (mount_failures or {}).get(name, ()), uses):
            same = found.setdefault(key, {})
            kept = same.get((problem.reason, problem.subject))
            if kept is None or len(problem.detail) > len(kept.detail):
                same[problem.reason, problem.subject] = problem
    order = {reason: i for i, reason in enumerate(POD_REASONS)}
    return {
        key: sorted(problems.values(), key=lambda p: (order[p.reason], p.subject))
        for key, problems in sorted(found.items())
    }


def mount_failures(events: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Pod name -> the messages of its FailedMount Events (as listed: newest last), each once."""
    result: dict[str, list[str]] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        if involved.get("kind") != "Pod" or event.get("reason") != "FailedMount":
            continue
        messages = result.setdefault(str(involved.get("name")), [])
        message = str(event.get("message") or "")
        # The kubelet's summary line ("Unable to attach or mount volumes: ... timed out") names no
        # cause; each volume's own failure comes in an Event of its own.
        if message and message not in messages and not message.startswith(SUMMARY_MOUNT_MESSAGE):
            messages.append(message)
    return result


def _waits_for_volumes(pod: Mapping[str, Any]) -> bool:
    """Scheduled, yet no container started: the kubelet is still mounting its volumes."""
    status = pod.get("status") or {}
    conditions = status.get("conditions") or []
    scheduled = any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in conditions)
    return scheduled and not _is_ready(status) and not _started(status)


def needs_mount_events(pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a pod waits for its volumes: only its Events can say why."""
    return any(_waits_for_volumes(pod) for pod in pods)
