"""The routing table: sticky buckets, the monotonic-move guarantee, weights, fallbacks and bad input."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from captionfleet.runtime.router.sources import parse_routes_document, static_table
from captionfleet.runtime.router.table import (
    BUCKETS,
    RoutingTable,
    TableError,
    Version,
    assign_roles,
    bucket_of,
    check_url,
    from_mapping,
)

USERS = [f"user-{i}" for i in range(20_000)]
EP = ("http://127.0.0.1:1",)


def rollout(canary: int, variant: int = 0) -> RoutingTable:
    """stable v1, canary v2 at ``canary`` %, optional variant v3 at ``variant`` %."""
    versions = [Version("v1", 100 - canary - variant, "stable", EP), Version("v2", canary, "canary", EP)]
    if variant:
        versions.append(Version("v3", variant, "variant", EP))
    return RoutingTable(tuple(versions))


def assignment(table: RoutingTable) -> dict[str, str]:
    rng = random.Random(0)
    result = {}
    for user in USERS:
        pick = table.pick(user, rng)
        assert pick is not None
        result[user] = pick.version.name
    return result


def test_buckets_are_stable_and_spread() -> None:
    # Fixed values: the same user lands in the same bucket on every replica and every Python run.
    assert bucket_of("alice") == 4729 and bucket_of("bob") == 9842
    counts = Counter(bucket_of(u) * 10 // BUCKETS for u in USERS)
    assert all(abs(counts[decile] - 2000) < 200 for decile in range(10)), counts


def test_the_same_user_gets_the_same_version_while_the_table_stays() -> None:
    table = rollout(30, 20)
    first, second = assignment(table), assignment(rollout(30, 20))
    assert first == second
    shares = Counter(first.values())
    assert abs(shares["v2"] / len(USERS) - 0.30) < 0.015
    assert abs(shares["v3"] / len(USERS) - 0.20) < 0.015


@pytest.mark.parametrize(
    ("before", "after", "variant"),
    [(0, 5, 0), (5, 10, 0), (10, 20, 0), (1, 50, 0), (20, 100, 0), (0, 5, 15), (10, 20, 15), (50, 85, 15)],
)
def test_a_growing_canary_only_takes_users_and_exactly_the_delta(
    before: int, after: int, variant: int
) -> None:
    old, new = assignment(rollout(before, variant)), assignment(rollout(after, variant))
    moved = [u for u in USERS if old[u] != new[u]]
    # Only users moving *to* the canary, and only from the stable version (the variant keeps its users).
    assert all(old[u] == "v1" and new[u] == "v2" for u in moved)
    assert all(new[u] == "v2" for u in USERS if old[u] == "v2")
    # Exactly the users whose bucket lies in the moved range: |delta| percent of the bucket space.
    expected = {u for u in USERS if before * 100 <= bucket_of(u) < after * 100}
    assert set(moved) == expected
    assert abs(len(moved) / len(USERS) - (after - before) / 100) < 0.015


def test_a_rollback_moves_canary_users_back_to_stable_only() -> None:
    old, new = assignment(rollout(30, 20)), assignment(rollout(0, 20))
    moved = [u for u in USERS if old[u] != new[u]]
    assert moved and all(old[u] == "v2" and new[u] == "v1" for u in moved)
    assert {u for u in USERS if old[u] == "v3"} == {u for u in USERS if new[u] == "v3"}


def test_weight_between_stable_and_first_variant_moves_monotonically() -> None:
    def table(variant: int) -> RoutingTable:
        return RoutingTable(
            (
                Version("a", 100 - variant - 10, "stable", EP),
                Version("z", 10, "variant", EP),
                Version("b", variant, "variant", EP),  # first variant by name: next to the stable range
            )
        )

    old, new = assignment(table(10)), assignment(table(30))
    moved = [u for u in USERS if old[u] != new[u]]
    assert moved and all(old[u] == "a" and new[u] == "b" for u in moved)


def test_layout_order_does_not_depend_on_source_order() -> None:
    a = RoutingTable((Version("v1", 80, "stable", EP), Version("v2", 20, "canary", EP)))
    b = RoutingTable((Version("v2", 20, "canary", EP), Version("v1", 80, "stable", EP)))
    assert assignment(a) == assignment(b)
    assert [(v.name, s, e) for v, s, e in a.ranges] == [("v2", 0, 2000), ("v1", 2000, 10000)]


def test_requests_without_a_user_are_spread_by_weight() -> None:
    table = rollout(10)

    def names(seed: int, count: int) -> list[str]:
        rng = random.Random(seed)
        return [pick.version.name for _ in range(count) if (pick := table.pick(None, rng)) is not None]

    picks = Counter(names(42, 20_000))
    assert abs(picks["v2"] / 20_000 - 0.10) < 0.01
    assert names(3, 200) == names(3, 200)  # seedable
    assert names(3, 200) != names(4, 200)


def test_zero_weight_versions_get_nothing() -> None:
    table = RoutingTable((Version("v1", 100, "stable", EP), Version("v2", 0, "canary", EP)))
    assert set(assignment(table).values()) == {"v1"}
    assert table.describe()[1] == {
        "version": "v2",
        "role": "canary",
        "weight": 0,
        "buckets": [0, 0],
        "endpoints": 1,
        "ready": False,
        "cold_start": False,
    }


def test_users_of_a_version_without_endpoints_fall_back_and_stay_put() -> None:
    table = RoutingTable((Version("v1", 70, "stable", EP), Version("v2", 30, "canary", ())))
    rng = random.Random(1)
    for user in USERS[:2000]:
        pick = table.pick(user, rng)
        owner = table.owner(bucket_of(user))
        assert pick is not None and owner is not None and pick.version.name == "v1"
        assert pick.meant_for == ("v2" if owner.name == "v2" else None)
    # Without endpoints anywhere, nothing is routable.
    dead = RoutingTable((Version("v1", 100, "stable", ()),))
    assert not dead.routable and dead.pick("u", rng) is None and dead.pick(None, rng) is None
    assert not RoutingTable.empty().routable


def test_weights_not_summing_to_100_scale() -> None:
    table = RoutingTable((Version("v1", 1, "stable", EP), Version("v2", 1, "canary", EP)))
    assert [(v.name, s, e) for v, s, e in table.ranges] == [("v2", 0, 5000), ("v1", 5000, 10000)]


def test_roles_follow_the_operators_rule() -> None:
    roles = assign_roles([("v1", 50), ("v2", 50), ("v3", 0)])
    assert roles == {"v1": "stable", "v2": "variant", "v3": "variant"}
    assert assign_roles([("v1", 10), ("v2", 90)], canary="v2") == {"v1": "stable", "v2": "canary"}
    with pytest.raises(TableError, match="canary 'v9'"):
        assign_roles([("v1", 100)], canary="v9")


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        ((Version("v1", 50, "stable"), Version("v1", 50, "canary")), "unique"),
        ((Version("v1", -1, "stable"),), "weight must be an integer"),
        ((Version("v1", 50, "stable"), Version("v2", 50, "stable")), "at most one stable"),
        ((Version("v1", 50, "canary"), Version("v2", 50, "canary")), "at most one canary"),
        ((Version("v1", 50, "boss"),), "role must be one of"),  # type: ignore[arg-type]
        ((Version("", 50, "stable"),), "needs a name"),
    ],
)
def test_bad_tables_are_refused(versions: tuple[Version, ...], message: str) -> None:
    with pytest.raises(TableError, match=message):
        RoutingTable(versions)


def test_from_mapping_checks_entries() -> None:
    table = from_mapping([{"name": "v1", "weight": 100, "endpoints": "http://10.0.0.1:8080/"}], source="t")
    assert table.versions == (Version("v1", 100, "stable", ("http://10.0.0.1:8080",)),)
    for entries, message in [
        ([{"weight": 100}], "name must be"),
        ([{"name": "v1", "weight": "100"}], "weight must be an integer"),
        ([{"name": "v1", "weight": 100, "endpoints": ["ftp://x"]}], "must look like http"),
        ([{"name": "v1", "weight": 100, "endpoints": ["http://h:1/path"]}], "no path"),
        ([{"name": "v1", "weight": 50, "role": "stable"}, {"name": "v2", "weight": 50}], "every version or"),
        (["v1"], "must be a mapping"),
    ]:
        with pytest.raises(TableError, match=message):
            from_mapping(entries, source="t")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:abc", "integer"),
        ("http://127.0.0.1:99999", "out of range"),
        ("http://127.0.0.1:0", "1..65535"),
        ("http://127.0.0.1:", "1..65535"),
        ("http://127.0.0.1:-1", "integer"),
        ("http://10.0.0.1:8080/v1", "path"),
        ("http://10.0.0.1:8080?x=1", "query"),
        ("http://10.0.0.1:8080#top", "fragment"),
        ("http://user:pass@10.0.0.1:8080", "user information"),
        ("http://:8080", "not a host name"),
        ("http://bad host:8080", "not a host name"),
        ("http://[::1:8080", "Invalid IPv6"),
        ("ftp://10.0.0.1:21", "must look like http"),
        ("10.0.0.1:8080", "must look like http"),
    ],
)
def test_bad_endpoint_urls_are_refused_with_the_version_and_the_url(url: str, reason: str) -> None:
    with pytest.raises(TableError, match=reason) as caught:
        from_mapping([{"name": "v7", "weight": 100, "endpoints": [url]}], source="t")
    assert "(v7)" in str(caught.value) and repr(url) in str(caught.value)
    with pytest.raises(TableError, match=reason) as caught:
        static_table([f"v7={url}"], [])
    assert "version v7" in str(caught.value) and repr(url) in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8080",
        "https://captions-v1.fleet.svc:8443/",
        "http://[fd00::7]:8080",
        "http://runtime",
    ],
)
def test_good_endpoint_urls_are_kept_without_the_trailing_slash(url: str) -> None:
    assert check_url(url) == url.rstrip("/")


def test_static_options() -> None:
    table = static_table(
        ["v1=http://127.0.0.1:8081", "v1=http://127.0.0.1:8083", "v2=http://127.0.0.1:8082"],
        ["v1=90", "v2=10"],
        canary="v2",
    )
    assert [(v.name, v.weight, v.role, len(v.endpoints)) for v in table.versions] == [
        ("v1", 90, "stable", 2),
        ("v2", 10, "canary", 1),
    ]
    only = static_table(["v1=http://a:1", "v2=http://b:2"], [])
    assert [(v.name, v.weight) for v in only.versions] == [("v1", 100), ("v2", 0)]
    for routes, weights, message in [
        ([], [], "at least one"),
        (["v1"], [], "name=value"),
        (["v1=http://a:1"], ["v2=100"], "v2 has no route"),
        (["v1=http://a:1"], ["v1=ninety"], "whole number"),
        (["v1=http://a:1", "v2=http://b:1"], ["v1=90", "v2=20"], "sum to 100"),
        (["v1=http://a:1"], ["v1=50", "v1=50"], "given twice"),
    ]:
        with pytest.raises(TableError, match=message):
            static_table(routes, weights)


def test_routes_documents() -> None:
    text = (
        "versions:\n"
        "  - {name: v1, weight: 80, role: stable, endpoints: [http://127.0.0.1:8081]}\n"
        "  - {name: v2, weight: 20, role: canary, endpoints: [http://127.0.0.1:8082]}\n"
    )
    table = parse_routes_document(text, "routes.yaml")
    assert [(v.name, v.role) for v in table.versions] == [("v1", "stable"), ("v2", "canary")]
    json_text = '{"versions": [{"name": "v1", "weight": 100, "endpoints": ["http://127.0.0.1:1"]}]}'
    assert parse_routes_document(json_text, "r.json").versions[0].role == "stable"
    for bad, message in [
        ("versions: [", "not valid YAML"),
        ("- a", "a list under 'versions'"),
        ("versions:\n  - {name: v1, weight: 90}\n", "sum to 100"),
    ]:
        with pytest.raises(TableError, match=message):
            parse_routes_document(bad, "bad.yaml")
