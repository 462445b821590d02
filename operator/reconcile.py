"""Reconciliation as plain async functions: validate, check ownership, apply, prune, write status.

The kopf handlers only call these and post the returned Events; everything that talks to the API
goes through a ``kube.Api`` (``kube.Kube`` in the operator). Status is written here (to the status
subresource), never the spec.

The operator touches only what it owns: before it applies a child it looks at the object of that name,
and one that is not controlled by this CaptionModel (a user's own object, or another CaptionModel's
child whose derived name collides) is left alone; the CaptionModel then reports ``NameConflict`` and
nothing is applied until the name is free. Pruning and deletion go by the project's labels *and* this
CaptionModel's owner reference, so they never remove what the operator did not create.
"""

from __future__ import annotations

import datetime
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from captionfleet.names import (
    COMPONENT_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    MODEL_LABEL,
    ROLLOUT_ACTION_ANNOTATION,
    VERSION_LABEL,
)
from captionfleet.operator import builders, coldstart, kube, pods, rollout, validation
from captionfleet.operator.builders.common import ClusterConfig, FleetContext, endpoint, version_name
from captionfleet.operator.cascade import cascade_status
from captionfleet.operator.coldstart import ColdState
from captionfleet.operator.events import Event, Reason
from captionfleet.operator.rollout import CanaryState
from captionfleet.operator.spec import CaptionModelSpec
from captionfleet.operator.status import (
    OPERATOR_TROUBLES,
    CaptionModelStatus,
    Trouble,
    fleet_status,
    invalid_status,
    problem_line,
    problem_subject,
)

Key = tuple[str, str, str]  # apiVersion, kind, name


@dataclass
class Outcome:
    """What a reconciliation decided: the status it wrote, the Events to post, whether to retry."""

    status: CaptionModelStatus | None = None
    events: list[Event] = field(default_factory=list)
    retry: str | None = None  # a reason to try again later (the API refused something)
    model: dict[str, Any] | None = None  # the CaptionModel as read, when it was read here


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: Mapping[str, Any]) -> Key:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The owner reference with ``controller: true``, if any."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    controller = controller_of(obj)
    return controller is not None and controller.get("uid") == uid


def _labels(name: str) -> dict[str, str]:
    """What every child of CaptionModel ``name`` is labelled with (and found by)."""
    return {MODEL_LABEL: name, MANAGED_BY_LABEL: MANAGER}


async def owned_children(api: kube.Api, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
    """Every child the CaptionModel controls: found by the project's labels, confirmed by owner reference."""
    found = []
    for kind in kube.CHILD_KINDS:
        for obj in await api.list(kind, namespace, _labels(name)):
            obj.setdefault("apiVersion", kind.api_version)  # list items may come without these
            obj.setdefault("kind", kind.kind)
            if _owned_by(obj, uid):
                found.append(obj)
    return found


def _by_version(deployments: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Mapping[str, Any]], Any]:
    versions: dict[str, Mapping[str, Any]] = {}
    router = None
    for obj in deployments:
        obj_labels = obj.get("metadata", {}).get("labels") or {}
        if obj_labels.get(COMPONENT_LABEL) == "router":
            router = obj
        elif VERSION_LABEL in obj_labels:
            versions[obj_labels[VERSION_LABEL]] = obj
    return versions, router


def canary_ready(spec: CaptionModelSpec, deployments: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the canary's Deployment has a ready pod (it gets traffic only then)."""
    canary = spec.canary()
    found = _by_version(deployments)[0].get(canary.name) if canary else None
    return bool(found and int((found.get("status") or {}).get("readyReplicas") or 0) > 0)


ProblemsByVersion = Mapping[str, Sequence[pods.PodProblem]]
# The kubelet's Events on a pod whose volumes cannot be mounted (a missing Secret volume).
MOUNT_FAILURES = {"involvedObject.kind": "Pod", "reason": "FailedMount"}


async def pod_problems(api: kube.Api, namespace: str, name: str, spec: CaptionModelSpec) -> ProblemsByVersion:
    """Why the fleet's pods do not start, by version (pods.py). The pods are read; the FailedMount
    Events only while a pod waits for its volumes (a missing Secret volume shows nowhere else)."""
    listed = await api.list(kube.POD, namespace, _labels(name))
    failures: dict[str, list[str]] = {}
    if pods.needs_mount_events(listed):
        failures = pods.mount_failures(await api.list(kube.EVENT, namespace, {}, fields=MOUNT_FAILURES))
    return pods.problems_by_version(listed, failures, pods.secret_uses(spec))


def pod_problem_events(problems: ProblemsByVersion, previous: Mapping[str, Any]) -> list[Event]:
    """A Warning per pod problem the last status did not name yet: once, not at every retry."""
    conditions = previous.get("conditions") or []
    degraded: Mapping[str, Any] = next((c for c in conditions if c.get("type") == "Degraded"), {})
    known = str(degraded.get("message") or "") if degraded.get("status") == "True" else ""
    events = []
    for key, listed in problems.items():
        for problem in listed:
            subject = problem_subject(key, problem)
            if subject not in known:
                events.append(Event.warning(problem.reason, problem_line(key, problem)))
    return events


def _status_of(
    ctx: FleetContext,
    deployments: Sequence[Mapping[str, Any]],
    generation: int,
    previous: Mapping[str, Any],
    trouble: Trouble | None,
    problems: ProblemsByVersion,
    cold: Mapping[str, ColdState],
) -> CaptionModelStatus:
    versions, router = _by_version(deployments)
    status = fleet_status(
        shares=ctx.shares,
        deployments=versions,
        services={v.name: version_name(ctx, v.name) for v in ctx.spec.versions},
        router=router,
        generation=generation,
        endpoint=endpoint(ctx),
        previous=previous,
        now=now(),
        rollout=ctx.rollout,
        trouble=trouble,
        pod_problems=problems,
        cold=cold,
    )
    return status.model_copy(update={"cascade": cascade_status(ctx.spec, previous)})


def _patch(status: CaptionModelStatus, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch from ``previous`` to ``status``: fields now unset become ``None`` (removed)."""
    new = status.manifest()
    return {**{key: None for key in previous if key not in new}, **new}


async def _manual_action(
    api: kube.Api, body: Mapping[str, Any], spec: CaptionModelSpec, state: CanaryState | None
) -> tuple[CanaryState | None, list[Event]]:
    """Apply the rollout-action annotation, if any, once: it is removed after being acted on."""
    meta = body["metadata"]
    action = (meta.get("annotations") or {}).get(ROLLOUT_ACTION_ANNOTATION)
    if action is None:
        return state, []
    await api.remove_annotation(
        kube.CAPTION_MODEL, meta["namespace"], meta["name"], ROLLOUT_ACTION_ANNOTATION
    )
    action = str(action).strip().lower()
    if action not in rollout.ACTIONS:
        return state, [Event.warning(Reason.ROLLOUT_ACTION, rollout.unknown_action(action))]
    if state is None:
        return state, [Event.warning(Reason.ROLLOUT_ACTION, f"{action}: there is no canary in rollout")]
    decision = rollout.act(action, state, total=rollout.pool(spec))
    if decision.kind == "promote":
        return decision.state, [Event.normal(Reason.PROMOTED, decision.message)]
    if decision.kind == "rollback":
        return decision.state, [Event.warning(Reason.ROLLED_BACK, decision.message)]
    return state, [Event.warning(Reason.ROLLOUT_ACTION, decision.message)]


def _owner_text(obj: Mapping[str, Any]) -> str:
    controller = controller_of(obj)
    if controller is None:
        return "no CaptionModel (it was created by someone else)"
    return f"{controller.get('kind')} {controller.get('name')} (uid {controller.get('uid')})"


@dataclass(frozen=True)
class Plan:
    """One reconciliation's view: the fleet, the manifests it wants, and the children it already has."""

    ctx: FleetContext
    desired: list[dict[str, Any]]
    existing: dict[Key, dict[str, Any]]


async def name_conflicts(api: kube.Api, plan: Plan) -> list[str]:
    """Children whose name is taken by an object this CaptionModel does not control, or that two of
    its own children would share; one sentence each, naming the object and its owner."""
    ctx, desired, existing = plan.ctx, plan.desired, plan.existing
    counts = Counter(_key(manifest) for manifest in desired)
    problems = [
        f"{kind} {name} is derived twice from this spec" for (_, kind, name), n in counts.items() if n > 1
    ]
    for manifest in desired:
        key = _key(manifest)
        if key in existing:
            continue  # ours: found by label and owner reference
        found = await api.get(kube.kind_of(manifest), ctx.namespace, key[2])
        if found is not None and not _owned_by(found, ctx.uid):
            problems.append(f"{key[1]} {key[2]} already exists and belongs to {_owner_text(found)}")
    return problems


async def _apply_all(api: kube.Api, plan: Plan, outcome: Outcome) -> tuple[list[dict[str, Any]], list[str]]:
    """Apply every manifest; (what was stored, what the API refused)."""
    errors, applied = [], []
    for manifest in plan.desired:
        what = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            applied.append(await api.apply(manifest))
        except kube.KubeError as e:
            errors.append(f"{what}: {e.message}")
            outcome.events.append(Event.warning(Reason.APPLY_FAILED, f"{what}: {e.message}"))
            continue
        if _key(manifest) not in plan.existing:
            outcome.events.append(Event.normal(Reason.CREATED, what))
    return applied, errors


async def _prune(api: kube.Api, plan: Plan, outcome: Outcome) -> None:
    """Delete the owned children no longer in the spec."""
    wanted = {_key(manifest) for manifest in plan.desired}
    for key, obj in plan.existing.items():
        if key not in wanted:
            await api.delete(kube.kind_of(obj), plan.ctx.namespace, key[2])
            outcome.events.append(Event.normal(Reason.DELETED, f"{key[1]} {key[2]}: no longer in the spec"))


async def _fresh(api: kube.Api, body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The CaptionModel as stored now: the loop may have moved its status, and a handled rollout
    action may have been removed, since ``body`` was taken."""
    meta = body["metadata"]
    stored = await api.get(kube.CAPTION_MODEL, meta["namespace"], meta["name"])
    return stored if stored is not None and stored["metadata"].get("uid") == meta["uid"] else body


async def _invalid(
    api: kube.Api, meta: Mapping[str, Any], generation: int, previous: Mapping[str, Any], problems: list[str]
) -> Outcome:
    message = "; ".join(problems)
    status = invalid_status(message=message, generation=generation, previous=previous, now=now())
    await api.patch_status(kube.CAPTION_MODEL, meta["namespace"], meta["name"], _patch(status, previous))
    return Outcome(status, [Event.warning(Reason.INVALID_SPEC, f"{message}; running children are kept")])


async def _context(
    api: kube.Api,
    meta: Mapping[str, Any],
    spec: CaptionModelSpec,
    config: ClusterConfig,
    state: CanaryState | None,
    deployments: Sequence[Mapping[str, Any]],
) -> FleetContext:
    keda = spec.autoscaling.provider != "keda" or await api.installed(kube.SCALED_OBJECT, meta["namespace"])
    return fleet_context(meta, spec, config, state, canary_ready=canary_ready(spec, deployments), keda=keda)


def fleet_context(
    meta: Mapping[str, Any],
    spec: CaptionModelSpec,
    config: ClusterConfig,
    state: CanaryState | None,
    *,
    canary_ready: bool,
    keda: bool = True,
) -> FleetContext:
    """The builders' view of the CaptionModel of ``meta``."""
    return FleetContext.create(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        spec=spec,
        config=config,
        rollout=state,
        canary_ready=canary_ready,
        keda_installed=keda,
    )


def _cold(
    ctx: FleetContext, previous: Mapping[str, Any], decided: Mapping[str, ColdState] | None
) -> dict[str, ColdState]:
    """The scale-to-zero states: the decided ones, else the stored ones, of the versions whose floor
    is 0 now."""
    stored = coldstart.current(ctx, previous, time.time())
    return {name: (decided or {}).get(name, state) for name, state in stored.items()}


def _keda_missing(ctx: FleetContext) -> Trouble | None:
    if ctx.keda_installed:
        return None
    return Trouble(
        "KedaNotInstalled",
        "autoscaling.provider is keda, but KEDA (keda.sh/v1alpha1 ScaledObject) is not installed in this "
        "cluster: each version runs its floor of replicas (at least 1) without an autoscaler until it is",
    )


async def reconcile(
    api: kube.Api,
    body: Mapping[str, Any],
    config: ClusterConfig,
    *,
    rollout_state: CanaryState | None = None,
    cold_states: Mapping[str, ColdState] | None = None,
) -> Outcome:
    """Bring the children in line with the spec of ``body`` (a CaptionModel) and write its status.

    The rollout state is the stored one (read afresh: the loop may have moved it since ``body`` was
    taken) unless ``rollout_state`` gives the one an analysis check just decided; the same holds for
    the scale-to-zero states and ``cold_states`` (the demand poll's decision).
    """
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    fresh = await _fresh(api, body)
    previous = dict(fresh.get("status") or {})
    spec, problems = validation.check(meta["name"], body.get("spec"), config)
    if problems or spec is None:
        return await _invalid(api, meta, generation, previous, problems)

    outcome = Outcome()
    if previous.get("phase") == "Invalid":
        outcome.events.append(Event.normal(Reason.RECOVERED, "the spec is valid again"))
    state = rollout_state or rollout.current(spec, previous.get("rollout"))
    restarted = rollout.restart_note(previous.get("rollout"), state)
    if restarted is not None:
        outcome.events.append(Event.warning(Reason.ROLLOUT_RESTARTED, restarted))
    state, manual = await _manual_action(api, fresh, spec, state)
    outcome.events += manual
    owned = await owned_children(api, meta["namespace"], meta["name"], meta["uid"])
    existing = {_key(obj): obj for obj in owned}
    ctx = await _context(api, meta, spec, config, state, [o for o in owned if o["kind"] == "Deployment"])
    cold = _cold(ctx, previous, cold_states)
    ctx = ctx.with_cold(coldstart.phases(cold))
    desired = builders.fleet(ctx)
    converged = await _converge(api, Plan(ctx, desired, existing), outcome)
    deployments = [obj for obj in converged.objects if obj.get("kind") == "Deployment"]
    not_starting = await pod_problems(api, ctx.namespace, ctx.name, spec)
    outcome.status = _status_of(ctx, deployments, generation, previous, converged.trouble, not_starting, cold)
    outcome.events += pod_problem_events(not_starting, previous)
    await api.patch_status(kube.CAPTION_MODEL, ctx.namespace, ctx.name, _patch(outcome.status, previous))
    if converged.trouble is None or converged.trouble.reason == "KedaNotInstalled":
        split = ", ".join(f"{share.name}={share.weight}% ({share.role})" for share in ctx.shares)
        message = f"generation {generation}: {len(desired)} objects applied; {split}"
        outcome.events.append(Event.normal(Reason.RECONCILED, message))
    # Deployments that changed between the apply and the status write sent their events while the
    # status still named the older generation, so they were skipped: look once more.
    refreshed = await refresh_status(api, ctx.namespace, ctx.name, config)
    outcome.events += refreshed.events
    outcome.status = refreshed.status or outcome.status
    return outcome


@dataclass(frozen=True)
class Converged:
    """The children as they now stand (applied, or kept when nothing could be), and what went wrong."""

    objects: list[dict[str, Any]]
    trouble: Trouble | None


async def _converge(api: kube.Api, plan: Plan, outcome: Outcome) -> Converged:
    """Apply and prune, unless a child's name is taken (then nothing at all is touched)."""
    conflicts = await name_conflicts(api, plan)
    if conflicts:
        message = "; ".join(conflicts) + ": nothing is applied until the name is free (rename or remove it)"
        outcome.events.append(Event.warning(Reason.NAME_CONFLICT, message))
        return Converged(list(plan.existing.values()), Trouble("NameConflict", message))
    applied, errors = await _apply_all(api, plan, outcome)
    # Prune only after everything applied: when the API refused something, what runs stays.
    if errors:
        outcome.retry = "; ".join(errors)
        return Converged(applied, Trouble("ApplyFailed", outcome.retry))
    await _prune(api, plan, outcome)
    trouble = _keda_missing(plan.ctx)
    if trouble is not None:
        outcome.events.append(Event.warning(Reason.KEDA_NOT_INSTALLED, trouble.message))
    return Converged(applied, trouble)


def _standing_trouble(previous: Mapping[str, Any]) -> Trouble | None:
    """What the last reconciliation found wrong (a refused apply, a taken name, no KEDA) stands until
    the next one, whatever the Deployments report meanwhile."""
    for cond in previous.get("conditions") or []:
        degraded = cond.get("type") == "Degraded" and cond.get("status") == "True"
        if degraded and cond.get("reason") in OPERATOR_TROUBLES:
            return Trouble(str(cond["reason"]), str(cond.get("message") or ""))
    return None


REFRESH_ATTEMPTS = 3


async def refresh_status(api: kube.Api, namespace: str, name: str, config: ClusterConfig) -> Outcome:
    """Recompute the status from the Deployments as they are now (after a Deployment changed).

    Only for a spec already reconciled (status.observedGeneration is the current generation) and
    valid; the write carries the resourceVersion read, so it never overwrites a newer status. When
    someone wrote meanwhile, it reads and computes again (theirs may predate this Deployment change).
    """
    for _ in range(REFRESH_ATTEMPTS):
        try:
            return await _refresh_once(api, namespace, name, config)
        except kube.Conflict:
            continue
    return Outcome()


async def _refresh_once(api: kube.Api, namespace: str, name: str, config: ClusterConfig) -> Outcome:
    body = await api.get(kube.CAPTION_MODEL, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome()
    meta = body["metadata"]
    previous = dict(body.get("status") or {})
    generation = int(meta.get("generation") or 0)
    if previous.get("observedGeneration") != generation or previous.get("phase") == "Invalid":
        return Outcome()
    spec, problems = validation.check(name, body.get("spec"), config)
    if problems or spec is None:
        return Outcome()
    listed = await api.list(kube.DEPLOYMENT, namespace, _labels(name))
    owned = [obj for obj in listed if _owned_by(obj, meta["uid"])]
    trouble = _standing_trouble(previous)
    ctx = fleet_context(
        meta,
        spec,
        config,
        rollout.current(spec, previous.get("rollout")),
        canary_ready=canary_ready(spec, owned),
        keda=trouble is None or trouble.reason != "KedaNotInstalled",
    )
    cold = coldstart.current(ctx, previous, time.time())
    not_starting = await pod_problems(api, namespace, name, spec)
    status = _status_of(ctx, owned, generation, previous, trouble, not_starting, cold)
    if status.manifest() == CaptionModelStatus.model_validate(previous).manifest():
        return Outcome(status)
    await api.patch_status(
        kube.CAPTION_MODEL,
        namespace,
        name,
        _patch(status, previous),
        resource_version=meta.get("resourceVersion"),
    )
    events = pod_problem_events(not_starting, previous)
    if status.phase != previous.get("phase") and status.phase is not None:
        ready = next(cond for cond in status.conditions if cond.type == "Ready")
        kind = Event.warning if status.phase == "Degraded" else Event.normal
        events.append(kind(Reason(status.phase), ready.message))
    return Outcome(status, events, model=body)


async def clean_up(api: kube.Api, body: Mapping[str, Any]) -> list[Event]:
    """On deletion: remove the children now, traffic first (router Service, then the versions).

    Owner references would let the garbage collector do it eventually and in no order. Only what this
    CaptionModel controls (labels and owner reference) is deleted. With ``--cascade=orphan`` the user
    asked to keep the children, so nothing is deleted.
    """
    meta = body["metadata"]
    if "orphan" in (meta.get("finalizers") or []):
        return [Event.normal(Reason.ORPHANED, "children kept (deleted with --cascade=orphan)")]
    children = await owned_children(api, meta["namespace"], meta["name"], meta["uid"])
    order = {kind: i for i, kind in enumerate(kube.CHILD_KINDS)}

    def rank(obj: Mapping[str, Any]) -> tuple[int, int]:
        router_first = 0 if obj["metadata"].get("labels", {}).get(COMPONENT_LABEL) == "router" else 1
        return router_first, order[kube.kind_of(obj)]

    events = []
    for obj in sorted(children, key=rank):
        if await api.delete(kube.kind_of(obj), meta["namespace"], obj["metadata"]["name"]):
            events.append(Event.normal(Reason.DELETED, f"{obj['kind']} {obj['metadata']['name']}"))
    return events
