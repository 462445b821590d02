"""The cost of the out-of-distribution score in served throughput: ours with it, and with ``--ood false``.

Both servers get the same photos from the same number of clients, in alternating rounds (on, off,
on, off...) of ``steady_requests`` each after one uncounted wave of their clients, and the rounds'
throughputs are summed per side. The photos are all out of
distribution, which would give the scored server's captions the stricter n-gram ban (shorter
captions, a different workload); both servers are therefore run with one n-gram size, so the runs
differ by the scoring alone (the features, the distances, the drift window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from captionfleet.bench.loadgen import LoadResult, Payload, run_load
from captionfleet.bench.serving import CAPTION_PATH, progress
from captionfleet.bench.settings import BenchSettings


@dataclass
class OodCost:
    concurrency: int
    scored: list[LoadResult] = field(default_factory=list)
    unscored: list[LoadResult] = field(default_factory=list)

    @staticmethod
    def _throughput(results: list[LoadResult]) -> float:
        elapsed = sum(result.elapsed_s for result in results)
        return sum(result.ok for result in results) / elapsed if elapsed > 0 else math.nan

    @property
    def scored_rps(self) -> float:
        return self._throughput(self.scored)

    @property
    def unscored_rps(self) -> float:
        return self._throughput(self.unscored)

    @property
    def cost(self) -> float:
        """Share of throughput the score costs: 1 - scored / unscored (negative: within noise, faster)."""
        return 1.0 - self.scored_rps / self.unscored_rps if self.unscored_rps > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "scored_rps": round(self.scored_rps, 2),
            "unscored_rps": round(self.unscored_rps, 2),
            "cost": round(self.cost, 4),
            "rounds": len(self.scored),
        }


async def measure_ood_cost(
    scored_url: str, unscored_url: str, payloads: list[Payload], settings: BenchSettings
) -> OodCost:
    level = settings.ood_concurrency
    cost = OodCost(level)
    for url in (scored_url, unscored_url):  # warm both, so neither pays for a first batch shape
        await run_load(url + CAPTION_PATH, payloads, concurrency=level, count=level)
    for round_index in range(settings.ood_rounds):
        order = [(scored_url, cost.scored), (unscored_url, cost.unscored)]
        for url, runs in order if round_index % 2 == 0 else order[::-1]:
            progress(f"OOD cost: {'scored' if runs is cost.scored else 'unscored'} at concurrency {level}")
            runs.append(
                await run_load(
                    url + CAPTION_PATH,
                    payloads,
                    concurrency=level,
                    count=settings.steady_count(level),
                    max_seconds=settings.run_seconds,
                    warm_wave=True,
                )
            )
    return cost
