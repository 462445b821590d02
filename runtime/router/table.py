"""The routing table: versions with weights and endpoints, and which version answers which request.

Pure and deterministic: every router replica that holds the same table sends a given user to the same
version, with no state shared between them.

Sticky assignment
-----------------
A user id is hashed (BLAKE2b) to one of ``BUCKETS`` = 10 000 buckets. Each version owns one contiguous
range of buckets, ``weight / total`` of them, laid out in a fixed order that depends only on the roles
and names, never on the weights:

    [ canary ][ stable ][ variants, by name ... ]

Guarantees (``tests/runtime/router/test_table.py`` checks them over many user ids):

1. While the table stays put, a user id always gets the same version.
2. When weight moves between the canary and the stable version (a rollout step or a rollback), only
   the users whose bucket lies in the moved range change version, all of them between those two, and
   exactly ``|delta|`` percent of the bucket space moves: the canary's range grows from bucket 0 and
   the stable range's far edge stays where it is. A canary going 5 -> 10 -> 20 % keeps every user it
   already had. The same holds between the stable version and the first variant (by name).
3. Other changes (several weights at once, a version's role changing) move at most the users whose
   bucket changes owner; nothing else is promised for them.

Requests without a user id are spread at random in proportion to the weights.

A version with weight > 0 but no endpoints (no ready pods) cannot take traffic; its users are sent to
the routable versions by the same bucket, laid out over the routable versions only (still sticky
while the table stays put), and the answer says which version they were meant for. A version marked
``cold_start`` (it may be scaled to zero) is the exception: it keeps its users, and the requests
without a user its weight draws, while it has no endpoints; the router holds them until its first pod
is ready (``coldstart.py``). It is *servable*: it takes traffic, by holding it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from captionfleet.runtime.router.cascade import CascadePlan

BUCKETS = 10_000
Role = Literal["stable", "canary", "variant"]
ROLES: tuple[Role, ...] = ("stable", "canary", "variant")


class TableError(ValueError):
    """A routing table that cannot be used: duplicate names, negative weights, several canaries, ..."""


@dataclass(frozen=True)
class Version:
    """One model version as the router sees it."""

    name: str
    weight: int  # percent of traffic (the effective weight; sums to 100 over the table)
    role: Role
    endpoints: tuple[str, ...] = ()  # base URLs: http://10.0.0.7:8080
    cold_start: bool = False  # without endpoints, its requests are held for its first pod (no fallback)
    mirror: int = 0  # percent of the other versions' requests copied to it in the background (shadow.py)

    @property
    def routable(self) -> bool:
        """Takes traffic now: a weight and ready endpoints."""
        return self.weight > 0 and bool(self.endpoints)

    @property
    def cold(self) -> bool:
        """Its requests are held now: a cold_start version with a weight and no ready endpoint."""
        return self.weight > 0 and self.cold_start and not self.endpoints

    @property
    def servable(self) -> bool:
        """Takes traffic, sent on at once or held for its first pod."""
        return self.routable or self.cold


@dataclass(frozen=True)
class Pick:
    """The version chosen for one request, and the one it was meant for when that had no endpoints."""

    version: Version
    meant_for: str | None = None  # set when the assigned version was not routable


def bucket_of(user_id: str) -> int:
    """The user's bucket in 0..BUCKETS-1: the same on every replica and every Python run."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def assign_roles(weights: Sequence[tuple[str, int]], canary: str | None = None) -> dict[str, Role]:
    """Roles by the operator's rule: the named canary; the stable is the non-canary version with the most
    weight (the first of equals, in the given order); the rest are variants."""
    names = [name for name, _ in weights]
    if canary and canary not in names:
        raise TableError(f"the canary {canary!r} is not one of the versions {names}")
    stable = max(((n, w) for n, w in weights if n != canary), key=lambda nw: nw[1], default=None)
    roles: dict[str, Role] = {}
    for name, _ in weights:
        roles[name] = "canary" if name == canary else "stable" if stable and name == stable[0] else "variant"
    return roles


def _layout_order(versions: Iterable[Version]) -> list[Version]:
    canaries = sorted((v for v in versions if v.role == "canary"), key=lambda v: v.name)
    stables = [v for v in versions if v.role == "stable"]
    variants = sorted((v for v in versions if v.role == "variant"), key=lambda v: v.name)
    return canaries + stables + variants


def _ranges(versions: Sequence[Version]) -> tuple[tuple[Version, int, int], ...]:
    """Contiguous [start, end) bucket ranges in layout order; weights scale to BUCKETS."""
    total = sum(v.weight for v in versions)
    if total <= 0:
        return ()
    result = []
    cumulative = 0
    for version in _layout_order(versions):
        if version.weight <= 0:
            continue
        start = cumulative * BUCKETS // total
        cumulative += version.weight
        result.append((version, start, cumulative * BUCKETS // total))
    return tuple(result)


def _find(ranges: Sequence[tuple[Version, int, int]], bucket: int) -> Version | None:
    for version, start, end in ranges:
        if start <= bucket < end:
            return version
    return None


@dataclass(frozen=True)
class RoutingTable:
    """Versions (in the order of their source) with their bucket ranges; immutable."""

    versions: tuple[Version, ...]
    source: str = ""  # where it came from, for /v1/models and logs
    cascade: CascadePlan | None = None  # the versions' two tiers, when requests cascade (cascade.py)
    ranges: tuple[tuple[Version, int, int], ...] = field(init=False, repr=False, compare=False)
    # Over the servable versions: those with endpoints and the cold ones, which hold their requests.
    routable_ranges: tuple[tuple[Version, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [v.name for v in self.versions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TableError(f"version names must be unique; repeated: {', '.join(duplicates)}")
        for version in self.versions:
            if not version.name:
                raise TableError("every version needs a name")
            if isinstance(version.weight, bool) or not isinstance(version.weight, int) or version.weight < 0:
                raise TableError(
                    f"version {version.name}: weight must be an integer >= 0, got {version.weight!r}"
                )
            if version.role not in ROLES:
                raise TableError(f"version {version.name}: role must be one of {', '.join(ROLES)}")
            if isinstance(version.mirror, bool) or not isinstance(version.mirror, int):
                raise TableError(f"version {version.name}: mirror must be an integer percent")
            if not 0 <= version.mirror <= 100:
                raise TableError(f"version {version.name}: mirror must be in 0..100, got {version.mirror}")
        if sum(1 for v in self.versions if v.mirror) > 1:
            raise TableError("at most one version may be mirrored to (the canary in its shadow phase)")
        for role in ("stable", "canary"):
            holders = [v.name for v in self.versions if v.role == role]
            if len(holders) > 1:
                raise TableError(f"at most one {role} version; got {', '.join(holders)}")
        object.__setattr__(self, "ranges", _ranges(self.versions))
        object.__setattr__(self, "routable_ranges", _ranges([v for v in self.versions if v.servable]))

    @classmethod
    def empty(cls, source: str = "") -> RoutingTable:
        return cls((), source)

    @property
    def routable(self) -> bool:
        """At least one version can take traffic (at once, or held through its cold start)."""
        return bool(self.routable_ranges)

    def version(self, name: str) -> Version | None:
        return next((v for v in self.versions if v.name == name), None)

    def mirror_target(self) -> Version | None:
        """The version that receives copies of the others' requests (shadow.py), if one has endpoints."""
        return next((v for v in self.versions if v.mirror and v.endpoints), None)

    def owner(self, bucket: int) -> Version | None:
        """The version that owns ``bucket`` by weight, routable or not."""
        return _find(self.ranges, bucket)

    def pick(self, user_id: str | None, rng: random.Random) -> Pick | None:
        """The version for one request: sticky by ``user_id``, else weighted random; None if none routable."""
        if not self.routable_ranges:
            return None
        if user_id:
            bucket = bucket_of(user_id)
            assigned = _find(self.ranges, bucket)
            if assigned is not None and assigned.servable:
                return Pick(assigned)
            fallback = _find(self.routable_ranges, bucket)
            assert fallback is not None  # the routable ranges cover every bucket
            return Pick(fallback, assigned.name if assigned is not None else None)
        routable = [v for v, _, _ in self.routable_ranges]
        return Pick(rng.choices(routable, weights=[v.weight for v in routable])[0])

    def describe(self) -> list[dict[str, Any]]:
        """The table as JSON, for GET /v1/models and logs (endpoint addresses are counted, not shown)."""
        spans = {v.name: (start, end) for v, start, end in self.ranges}
        described = []
        for v in self.versions:
            entry: dict[str, Any] = {
                "version": v.name,
                "role": v.role,
                "weight": v.weight,
                "buckets": list(spans.get(v.name, (0, 0))),
                "endpoints": len(v.endpoints),
                "ready": v.routable,
                "cold_start": v.cold_start,
            }
            if v.mirror:  # only a canary in its shadow phase
                entry["mirror"] = v.mirror
            described.append(entry)
        return described


def same_routes(a: RoutingTable, b: RoutingTable) -> bool:
    """Equal versions, weights, roles, endpoints and cascade (the source text aside)."""
    return a.versions == b.versions and a.cascade == b.cascade


def from_mapping(
    entries: Sequence[Mapping[str, Any]], *, source: str, canary: str | None = None
) -> RoutingTable:
    """A table from ``[{name, weight, role?, endpoints, cold_start?, mirror?}]`` (a routes file's or the
    status's shape).

    Roles missing from every entry are assigned by :func:`assign_roles`; given on some, they must be on all.
    """
    versions = []
    pairs = []
    mirrors: dict[str, Any] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise TableError(f"versions[{index}] must be a mapping, got {type(entry).__name__}")
        name = entry.get("name")
        weight = entry.get("weight", 0)
        if not isinstance(name, str) or not name:
            raise TableError(f"versions[{index}].name must be a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise TableError(f"versions[{index}] ({name}).weight must be an integer >= 0, got {weight!r}")
        endpoints = entry.get("endpoints") or []
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not isinstance(endpoints, list) or not all(isinstance(e, str) and e for e in endpoints):
            raise TableError(f"versions[{index}] ({name}).endpoints must be a list of URLs")
        cold_start = entry.get("cold_start", False)
        if not isinstance(cold_start, bool):
            raise TableError(f"versions[{index}] ({name}).cold_start must be true or false")
        pairs.append((name, weight))
        versions.append(
            (name, weight, entry.get("role"), _checked_endpoints(index, name, endpoints), cold_start)
        )
        mirrors[name] = entry.get("mirror") or 0
    given: dict[str, Role] = {}
    for name, _, role, _, _ in versions:
        if role is not None and role not in ROLES:
            raise TableError(f"version {name}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if role is not None:
            given[name] = role
    if given and len(given) != len(versions):
        raise TableError("give a role to every version or to none")
    roles = given or assign_roles(pairs, canary)
    return RoutingTable(
        tuple(Version(n, w, roles[n], e, cold, mirrors[n]) for n, w, _, e, cold in versions), source
    )


def _checked_endpoints(index: int, name: str, endpoints: Sequence[str]) -> tuple[str, ...]:
    try:
        return tuple(check_url(e) for e in endpoints)
    except TableError as exc:
        raise TableError(f"versions[{index}] ({name}): {exc}") from None


def check_url(url: str) -> str:
    """An upstream base URL, ``http(s)://host[:port]`` without a trailing slash, or TableError.

    Checked here, when a table is built, because aiohttp only finds a bad port or host when it sends a
    request: a table with one would be accepted and then answer 500 to every request it routes.
    """
    text = url.strip().rstrip("/")
    shape = f"endpoint {url!r} must look like http://host:port (no path, query or user)"
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise TableError(f"{shape}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TableError(shape)
    if parts.path or parts.query or parts.fragment or "?" in text or "#" in text:
        raise TableError(f"{shape}: it has a path, query or fragment")
    if "@" in parts.netloc:
        raise TableError(f"{shape}: it has user information")
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise TableError(f"{shape}: the port must be in 1..65535")
    host = parts.hostname or ""
    if not _HOST.match(host) and not _is_ip(host):
        raise TableError(f"{shape}: {host!r} is not a host name or IP address")
    return text


# A DNS name (labels of letters, digits and hyphens; underscores as in some cluster names).
_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+$")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
