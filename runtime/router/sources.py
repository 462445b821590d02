"""Where the routing table comes from, besides the cluster: options and a file; and the holder of the
current table that every source publishes to and every request reads.

A routes file is JSON or YAML in the shape of the CaptionModel's ``status.versions[]`` plus endpoints::

    versions:
      - {name: v1, weight: 90, role: stable, endpoints: [http://127.0.0.1:8081, http://127.0.0.1:8083]}
      - {name: v2, weight: 10, role: canary, endpoints: [http://127.0.0.1:8082]}
    cascade: {fast: [v2], quality: [v1], threshold: 0.6}   # optional: see cascade.py

It is checked for changes every ``routes_file_poll_ms`` (a ConfigMap volume swaps a symlink, which no
inotify watch on the file would see) and a file that does not parse leaves the last good table in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from captionfleet.runtime.router.cascade import with_cascade
from captionfleet.runtime.router.table import RoutingTable, TableError, check_url, from_mapping, same_routes

log = logging.getLogger(__name__)


class TableHolder:
    """The current routing table; sources publish, requests read (one event loop, no locks needed)."""

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.table = table if table is not None else RoutingTable.empty("none yet")
        self.updated_at = time.time()
        self.updates = 0
        self.source_errors = 0
        self.last_error: str | None = None
        self._listeners: list[Callable[[RoutingTable], None]] = []

    def on_change(self, listener: Callable[[RoutingTable], None]) -> None:
        self._listeners.append(listener)
        listener(self.table)

    def publish(self, table: RoutingTable) -> bool:
        """Make ``table`` current; False (and nothing happens) when it routes exactly as the current one."""
        self.last_error = None
        if same_routes(table, self.table) and self.updates:
            return False
        self.table = table
        self.updated_at = time.time()
        self.updates += 1
        log.info("routing table updated", extra={"source": table.source, "versions": table.describe()})
        for listener in self._listeners:
            listener(table)
        return True

    def failed(self, message: str) -> None:
        """A source could not produce a table; the current one stays."""
        self.source_errors += 1
        self.last_error = message


def _pairs(items: Sequence[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise TableError(f"{what}: {item!r} must look like name=value")
        pairs.append((name.strip(), value.strip()))
    return pairs


def static_table(routes: Sequence[str], weights: Sequence[str], canary: str = "") -> RoutingTable:
    """``--routes v1=URL,v1=URL2,v2=URL --weights v1=90,v2=10 [--canary v2]`` as a table.

    Without weights, the first version gets all the traffic. Versions keep the order of ``routes``.
    """
    endpoints: dict[str, list[str]] = {}
    for name, url in _pairs(routes, "routes"):
        try:
            endpoints.setdefault(name, []).append(check_url(url))
        except TableError as exc:
            raise TableError(f"routes: version {name}: {exc}") from None
    if not endpoints:
        raise TableError("routes: give at least one version=URL")
    weight_of: dict[str, int] = {}
    for name, text in _pairs(weights, "weights"):
        if name not in endpoints:
            raise TableError(f"weights: {name} has no route")
        if name in weight_of:
            raise TableError(f"weights: {name} is given twice")
        try:
            weight_of[name] = int(text)
        except ValueError:
            raise TableError(f"weights: {name}={text} is not a whole number of percent") from None
    if not weight_of:
        weight_of = {next(iter(endpoints)): 100}
    entries = [{"name": n, "weight": weight_of.get(n, 0), "endpoints": urls} for n, urls in endpoints.items()]
    return _checked(from_mapping(entries, source="static options", canary=canary or None))


def _checked(table: RoutingTable) -> RoutingTable:
    total = sum(v.weight for v in table.versions)
    if total != 100:
        raise TableError(f"weights must sum to 100, they sum to {total}")
    return table


def parse_routes_document(text: str, origin: str) -> RoutingTable:
    """A routes file's text (JSON is YAML) as a table."""
    try:
        document: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TableError(f"{origin}: not valid YAML or JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("versions"), list):
        raise TableError(f"{origin}: expected a mapping with a list under 'versions'")
    try:
        table = _checked(from_mapping(document["versions"], source=f"file {origin}"))
        return with_cascade(table, document.get("cascade"))
    except TableError as exc:
        raise TableError(f"{origin}: {exc}") from exc


class RoutesFile:
    """Publishes the table of a routes file, now and whenever its content changes."""

    def __init__(self, path: str, holder: TableHolder, poll_s: float) -> None:
        self.path = Path(path)
        self.holder = holder
        self.poll_s = poll_s
        self._digest: bytes | None = None

    def load(self) -> None:
        """Read the file and publish its table if its content changed; raise on a bad file."""
        data = self.path.read_bytes()
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            self.holder.last_error = None  # back to the content last applied
            return
        table = parse_routes_document(data.decode("utf-8", errors="replace"), str(self.path))
        self._digest = digest
        self.holder.publish(table)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; errors are logged and counted, the last good table stays."""
        while not stop.is_set():
            try:
                self.load()
            except (OSError, TableError) as exc:
                message = str(exc)
                if message != self.holder.last_error:
                    log.error("routes file not applied; the last good table stays", extra={"error": message})
                self.holder.failed(message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_s)
