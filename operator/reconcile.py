"""Reconciliation as plain async functions: validate, apply the children, prune the stale, write status.

The kopf handlers only call these and post the returned Events; everything that talks to the API
goes through ``kube.Kube``. Status is written here (to the status subresource), never the spec.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from captionfleet.operator import builders, kube, rollout, validation
from captionfleet.operator.builders import common as c
from captionfleet.operator.rollout import CanaryState
from captionfleet.operator.status import CaptionModelStatus, fleet_status, invalid_status

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class Outcome:
    """What a reconciliation decided: the status it wrote, the Events to post, whether to retry."""

    status: CaptionModelStatus | None = None
    events: list[Event] = field(default_factory=list)
    retry: str | None = None  # a reason to try again later (the API refused something)
    model: dict[str, Any] | None = None  # the CaptionModel as read, when it was read here


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


async def owned_children(api: kube.Kube, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
    """Every child the CaptionModel controls, found by label and confirmed by owner reference."""
    found = []
    for kind in kube.CHILD_KINDS:
        for obj in await api.list(kind, namespace, {c.MODEL_LABEL: name}):
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
        if obj_labels.get(c.COMPONENT_LABEL) == "router":
            router = obj
        elif c.VERSION_LABEL in obj_labels:
            versions[obj_labels[c.VERSION_LABEL]] = obj
    return versions, router


def _status_of(
    ctx: c.FleetContext,
    deployments: Sequence[Mapping[str, Any]],
    generation: int,
    previous: Mapping[str, Any],
    errors: list[str],
) -> CaptionModelStatus:
    versions, router = _by_version(deployments)
    result = fleet_status(
        shares=ctx.shares,
        deployments=versions,
        services={v.name: c.version_name(ctx, v.name) for v in ctx.spec.versions},
        router=router,
        generation=generation,
        endpoint=c.endpoint(ctx),
        previous=previous,
        now=now(),
        rollout=ctx.rollout,
    )
    if not errors:
        return result
    message = "; ".join(errors)
    conditions = [
        cond.model_copy(update={"status": "True", "reason": "ApplyFailed", "message": message})
        if cond.type == "Degraded"
        else cond
        for cond in result.conditions
    ]
    return result.model_copy(update={"phase": "Degraded", "conditions": conditions})


def _patch(status: CaptionModelStatus, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch from ``previous`` to ``status``: fields now unset become ``None`` (removed)."""
    new = status.manifest()
    return {**{key: None for key in previous if key not in new}, **new}


async def _manual_action(
    api: kube.Kube, body: Mapping[str, Any], spec: Any, state: CanaryState | None
) -> tuple[CanaryState | None, list[Event]]:
    """Apply the rollout-action annotation, if any, once: it is removed after being acted on."""
    meta = body["metadata"]
    action = (meta.get("annotations") or {}).get(rollout.ACTION_ANNOTATION)
    if action is None:
        return state, []
    await api.remove_annotation(
        kube.CAPTION_MODEL, meta["namespace"], meta["name"], rollout.ACTION_ANNOTATION
    )
    if state is None:
        return state, [Event("Warning", "RolloutAction", f"{action}: there is no canary in rollout")]
    decision = rollout.act(str(action).strip().lower(), state, total=rollout.pool(spec))
    if decision.kind == "promote":
        return decision.state, [Event("Normal", "Promoted", decision.message)]
    if decision.kind == "rollback":
        return decision.state, [Event("Warning", "RolledBack", decision.message)]
    return state, [Event("Warning", "RolloutAction", decision.message)]


async def reconcile(
    api: kube.Kube,
    body: Mapping[str, Any],
    config: c.ClusterConfig,
    *,
    rollout_state: CanaryState | None = None,
) -> Outcome:
    """Bring the children in line with the spec of ``body`` (a CaptionModel) and write its status.

    The rollout state is the stored one (read afresh: the loop may have moved it since ``body`` was
    taken) unless ``rollout_state`` gives the one an analysis check just decided.
    """
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = int(meta.get("generation") or 0)
    previous = dict(body.get("status") or {})
    stored = await api.get(kube.CAPTION_MODEL, namespace, name)
    if stored is not None and stored["metadata"].get("uid") == uid:
        previous = dict(stored.get("status") or {})
    spec, problems = validation.check(name, body.get("spec"), config)
    if problems or spec is None:
        message = "; ".join(problems)
        status = invalid_status(message=message, generation=generation, previous=previous, now=now())
        await api.patch_status(kube.CAPTION_MODEL, namespace, name, _patch(status, previous))
        return Outcome(status, [Event("Warning", "InvalidSpec", f"{message}; running children are kept")])

    outcome = Outcome()
    if previous.get("phase") == "Invalid":
        outcome.events.append(Event("Normal", "Recovered", "the spec is valid again"))
    state = rollout_state or rollout.current(spec, previous.get("rollout"))
    state, manual = await _manual_action(api, stored or body, spec, state)
    outcome.events += manual
    ctx = c.FleetContext.create(
        name=name, namespace=namespace, uid=uid, spec=spec, config=config, rollout=state
    )
    desired = builders.fleet(ctx)
    existing = {_key(obj): obj for obj in await owned_children(api, namespace, name, uid)}

    errors, applied = [], []
    for manifest in desired:
        what = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            applied.append(await api.apply(manifest))
        except kube.KubeError as e:
            errors.append(f"{what}: {e.message}")
            outcome.events.append(Event("Warning", "ApplyFailed", f"{what}: {e.message}"))
            continue
        if _key(manifest) not in existing:
            outcome.events.append(Event("Normal", "Created", what))

    # Prune only after everything applied: when the API refused something, what runs stays.
    if not errors:
        wanted = {_key(manifest) for manifest in desired}
        for key, obj in existing.items():
            if key not in wanted:
                await api.delete(kube.kind_of(obj), namespace, key[2])
                outcome.events.append(Event("Normal", "Deleted", f"{key[1]} {key[2]}: no longer in the spec"))
    else:
        outcome.retry = "; ".join(errors)

    deployments = [obj for obj in applied if obj.get("kind") == "Deployment"]
    outcome.status = _status_of(ctx, deployments, generation, previous, errors)
    await api.patch_status(kube.CAPTION_MODEL, namespace, name, _patch(outcome.status, previous))
    split = ", ".join(f"{s.name}={s.weight}% ({s.role})" for s in ctx.shares)
    outcome.events.append(
        Event("Normal", "Reconciled", f"generation {generation}: {len(applied)} objects applied; {split}")
    )
    # Deployments that changed between the apply and the status write sent their events while the
    # status still named the older generation, so they were skipped: look once more.
    refreshed = await refresh_status(api, namespace, name, config)
    outcome.events += refreshed.events
    outcome.status = refreshed.status or outcome.status
    return outcome


async def refresh_status(api: kube.Kube, namespace: str, name: str, config: c.ClusterConfig) -> Outcome:
    """Recompute the status from the Deployments as they are now (after a Deployment changed).

    Only for a spec already reconciled (status.observedGeneration is the current generation) and
    valid; the write carries the resourceVersion read, so it never overwrites a newer status.
    """
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
    ctx = c.FleetContext.create(
        name=name,
        namespace=namespace,
        uid=meta["uid"],
        spec=spec,
        config=config,
        rollout=rollout.current(spec, previous.get("rollout")),
    )
    deployments = await api.list(kube.DEPLOYMENT, namespace, {c.MODEL_LABEL: name})
    owned = [obj for obj in deployments if _owned_by(obj, meta["uid"])]
    # What the API refused at the last reconciliation still stands until one succeeds.
    refused = [
        str(c.get("message"))
        for c in previous.get("conditions") or []
        if c.get("type") == "Degraded" and c.get("reason") == "ApplyFailed"
    ]
    status = _status_of(ctx, owned, generation, previous, refused)
    if status.manifest() == CaptionModelStatus.model_validate(previous).manifest():
        return Outcome(status)
    patch = _patch(status, previous)
    try:
        await api.patch_status(
            kube.CAPTION_MODEL, namespace, name, patch, resource_version=meta.get("resourceVersion")
        )
    except kube.KubeError as e:
        if e.status == 409:  # someone wrote a newer status meanwhile; theirs stands
            return Outcome()
        raise
    events = []
    if status.phase != previous.get("phase"):
        ready = next(cond for cond in status.conditions if cond.type == "Ready")
        kind: EventType = "Warning" if status.phase == "Degraded" else "Normal"
        events.append(Event(kind, str(status.phase), ready.message))
    return Outcome(status, events, model=body)


async def clean_up(api: kube.Kube, body: Mapping[str, Any]) -> list[Event]:
    """On deletion: remove the children now, traffic first (router Service, then the versions).

    Owner references would let the garbage collector do it eventually and in no order; this also
    covers children whose owner reference was removed by hand. With ``--cascade=orphan`` the user
    asked to keep the children, so nothing is deleted.
    """
    meta = body["metadata"]
    if "orphan" in (meta.get("finalizers") or []):
        return [Event("Normal", "Orphaned", "children kept (deleted with --cascade=orphan)")]
    children = await owned_children(api, meta["namespace"], meta["name"], meta["uid"])
    order = {kind: i for i, kind in enumerate(kube.CHILD_KINDS)}

    def rank(obj: Mapping[str, Any]) -> tuple[int, int]:
        router_first = 0 if obj["metadata"].get("labels", {}).get(c.COMPONENT_LABEL) == "router" else 1
        return router_first, order[kube.kind_of(obj)]

    events = []
    for obj in sorted(children, key=rank):
        if await api.delete(kube.kind_of(obj), meta["namespace"], obj["metadata"]["name"]):
            events.append(Event("Normal", "Deleted", f"{obj['kind']} {obj['metadata']['name']}"))
    return events
