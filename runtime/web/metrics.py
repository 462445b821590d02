"""The Prometheus registry of one process (server or router): its own, not the global one, so that
several in one process (tests) keep their own counts; metrics declared once, as class attributes.

A process's metrics class lists its metrics as a table of class attributes::

    class RouterMetrics(ProcessMetrics):
        requests = Declared.counter("captionfleet_router_requests", "Requests answered", "version", "code")

and :class:`ProcessMetrics` creates each of them in the instance's registry, in the order declared
(the order of the exposition). The declarations are data, so ``make docs`` lists every metric of both
processes (name, type, labels, help) from the same table that creates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from captionfleet.names import LATENCY_BUCKETS_S

M = TypeVar("M", Counter, Gauge, Histogram)


@dataclass(frozen=True)
class Declared(Generic[M]):
    """One metric of a process, declared as a class attribute of its :class:`ProcessMetrics`."""

    kind: type[M]
    name: str
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    """Histograms only; a process may give others per instance (``ProcessMetrics(buckets=...)``)."""

    @staticmethod
    def counter(name: str, documentation: str, *labels: str) -> Declared[Counter]:
        return Declared(Counter, name, documentation, labels)

    @staticmethod
    def gauge(name: str, documentation: str, *labels: str) -> Declared[Gauge]:
        return Declared(Gauge, name, documentation, labels)

    @staticmethod
    def histogram(
        name: str, documentation: str, *labels: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> Declared[Histogram]:
        return Declared(Histogram, name, documentation, labels, tuple(buckets))

    @property
    def exposed_name(self) -> str:
        """The name scraped: counters get the ``_total`` suffix the client library adds."""
        return self.name + "_total" if self.kind is Counter else self.name

    def create(self, registry: CollectorRegistry, buckets: Sequence[float] | None = None) -> M:
        if self.kind is Histogram:
            chosen = self.buckets if buckets is None else buckets
            return self.kind(self.name, self.documentation, self.labels, buckets=chosen, registry=registry)
        return self.kind(self.name, self.documentation, self.labels, registry=registry)

    # Typed access: on the class the declaration, on an instance the metric created from it (the
    # instance's own attribute, set by ProcessMetrics.__init__, shadows this non-data descriptor).
    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Declared[M]: ...
    @overload
    def __get__(self, instance: ProcessMetrics, owner: type[Any]) -> M: ...
    def __get__(self, instance: ProcessMetrics | None, owner: type[Any]) -> Declared[M] | M:
        if instance is None:
            return self
        raise AttributeError(f"{self.name} was not created: ProcessMetrics.__init__ did not run")


def declared_metrics(cls: type[ProcessMetrics]) -> Iterator[tuple[str, Declared[Any]]]:
    """(attribute, declaration) of every metric ``cls`` declares, base classes first, in order."""
    for klass in reversed(cls.__mro__):
        for attribute, value in vars(klass).items():
            if isinstance(value, Declared):
                yield attribute, value


class ProcessMetrics:
    def __init__(self, buckets: Mapping[str, Sequence[float]] | None = None) -> None:
        """Create every declared metric; ``buckets``: attribute -> buckets known only at run time."""
        self.registry = CollectorRegistry(auto_describe=True)
        chosen = buckets or {}
        for attribute, declared in declared_metrics(type(self)):
            setattr(self, attribute, declared.create(self.registry, chosen.get(attribute)))

    def collect_at_scrape(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Export what ``collect`` yields at each scrape: figures another object keeps counting."""
        self.registry.register(_ScrapeTime(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ScrapeTime(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def describe(self) -> list[Metric]:
        return []  # no fixed description: the registry then calls collect() at scrape time only

    def collect(self) -> Iterable[Metric]:
        return self._collect()
