"""The whole benchmark run: inputs, servers, each comparison in turn, and everything stopped at the end."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captionfleet.bench import processes
from captionfleet.bench.cache import measure_cache_hits
from captionfleet.bench.cascade import CascadeResult, measure_cascade
from captionfleet.bench.engine import EngineResult, measure_engine
from captionfleet.bench.jobs import BulkResult, measure_bulk
from captionfleet.bench.loadgen import LoadResult, Payload, run_load
from captionfleet.bench.models import BLIP_MINI, save_random_blip
from captionfleet.bench.ood import OodCost, measure_ood_cost
from captionfleet.bench.photos import request_photos
from captionfleet.bench.preprocess import PreprocessResult, measure_preprocessing
from captionfleet.bench.router import RouterResult, measure_router_overhead
from captionfleet.bench.serving import CAPTION_PATH, ServingRow, compare_serving, progress
from captionfleet.bench.settings import SHARE_CLIENTS, BenchSettings
from captionfleet.runtime.server.testing import RedisProcess
from captionfleet.settings.serve import ServeSettings

if TYPE_CHECKING:
    from captionfleet.settings.serve import ServeSettings

LARGER_MODEL_TOKENS = 20
BUNDLED_FAST = Path(__file__).resolve().parents[2] / "runtime" / "models" / "scenes-blip-fast"


@dataclass
class BenchResults:
    settings: BenchSettings
    quick: bool
    models: dict[str, str] = field(default_factory=dict)
    """Name -> description of each model served."""
    preprocess: list[PreprocessResult] = field(default_factory=list)
    serving: list[ServingRow] = field(default_factory=list)
    served_at_32: LoadResult | None = None
    """Our server alone at 32 clients, ``steady_count`` requests: served_share_of_offline_c32's numerator."""
    cache: LoadResult | None = None
    router: RouterResult | None = None
    engine: EngineResult | None = None
    """The engine without HTTP: the offline ceiling, decoder and int8 ratios."""
    bulk: BulkResult | None = None
    """Interactive latency with and without a job running, and the job's share of idle throughput."""
    ood: OodCost | None = None
    """Served throughput with the out-of-distribution score and without."""
    cascade: CascadeResult | None = None
    """The cascade (fast model first) against the quality model alone, at 32 clients."""
    elapsed_s: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


@contextlib.contextmanager
def working_directory(setting: str) -> Iterator[Path]:
    if setting:
        path = Path(setting)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="captionfleet-bench-") as name:
        yield Path(name)


def resolve_model(setting: str) -> Path:
    """The model directory to serve; raises ``ModelLoadError`` with the reason otherwise."""
    from captionfleet.runtime.engine.errors import ModelLoadError
    from captionfleet.runtime.engine.loading import bundled_model_dir, resolve_source

    if not setting:
        return bundled_model_dir()
    location = resolve_source(setting)
    if not isinstance(location, Path):  # the baseline loads files; a hub id would need the network
        raise ModelLoadError(f"--model must be a local directory in save_pretrained format, got {setting!r}")
    return location


async def run_suite(settings: BenchSettings, quick: bool) -> BenchResults:
    started = time.monotonic()
    results = BenchResults(settings=settings, quick=quick, machine=machine_info())
    model_dir = resolve_model(settings.model)
    results.models[model_dir.name] = (
        f"{model_dir.name} ({model_dir}); beams {settings.num_beams}, "
        f"at most {settings.max_new_tokens} tokens"
    )
    with working_directory(settings.workdir) as workdir:
        progress("preprocessing")
        results.preprocess = measure_preprocessing(
            settings.megapixels(), settings.preprocess_rounds, [model_dir, None]
        )
        payloads = [Payload(photo.jpeg) for photo in request_photos(settings.image_side)]
        progress("engine: offline pipeline, decoders, int8 (no server running)")
        results.engine = measure_engine(model_dir, payloads, settings)
        await _main_model(results, model_dir, workdir, payloads)
        results.bulk = await _bulk(model_dir, workdir, settings, payloads)
        results.cascade = await _cascade(model_dir, workdir, settings)
        if settings.larger_model and not quick:
            progress(f"writing the random {BLIP_MINI.name}")
            larger = save_random_blip(workdir / BLIP_MINI.name, BLIP_MINI, LARGER_MODEL_TOKENS)
            results.models[BLIP_MINI.name] = BLIP_MINI.describe() + (
                f"; random weights, beams {settings.num_beams}, exactly {LARGER_MODEL_TOKENS} tokens"
            )
            larger_settings = replace(settings, max_new_tokens=LARGER_MODEL_TOKENS)
            with _servers(larger, workdir, larger_settings, extras=False) as (ours, naive, _, _):
                results.serving += await compare_serving(
                    BLIP_MINI.name, ours.url, naive.url, payloads, larger_settings
                )
    results.elapsed_s = time.monotonic() - started
    results.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


async def _main_model(results: BenchResults, model_dir: Path, workdir: Path, payloads: list[Payload]) -> None:
    settings = results.settings
    with _servers(model_dir, workdir, settings, extras=True) as (ours, naive, cached, router):
        assert cached is not None and router is not None
        results.serving += await compare_serving(model_dir.name, ours.url, naive.url, payloads, settings)
        count = settings.steady_count(SHARE_CLIENTS)
        progress(f"served vs offline: ours at {SHARE_CLIENTS} clients, {count} requests")
        results.served_at_32 = await run_load(
            ours.url + CAPTION_PATH, payloads, concurrency=SHARE_CLIENTS, count=count, warm_wave=True
        )
        progress("cache hits")
        results.cache = await measure_cache_hits(
            cached.url, payloads[0], requests=settings.cache_requests, concurrency=settings.cache_concurrency
        )
        progress("router overhead")
        results.router = await measure_router_overhead(
            cached.url, router.url, payloads[1 % len(payloads)], requests=settings.router_requests
        )
    if settings.ood_rounds > 0:
        results.ood = await _ood_cost(model_dir, workdir, payloads, settings)


async def _ood_cost(
    model_dir: Path, workdir: Path, payloads: list[Payload], settings: BenchSettings
) -> OodCost:
    """Two servers of one n-gram size (see ``ood.py``), one scoring and one not, measured in turns."""
    base = _serve_base(settings)
    base = replace(base, ood_no_repeat_ngram_size=base.no_repeat_ngram_size)
    env = settings.environment()
    progress("starting the OOD-cost servers")
    started = [
        processes.start_ours(model_dir, workdir, cache=False, base=replace(base, ood=ood), name=name, env=env)
        for ood, name in ((True, "ours-ood"), (False, "ours-no-ood"))
    ]
    try:
        processes.wait_all_ready(list(started))
        return await measure_ood_cost(started[0].url, started[1].url, payloads, settings)
    finally:
        for server in started:
            server.stop()


def _serve_base(settings: BenchSettings) -> ServeSettings:
    """Our servers' settings in every run (each then sets its model, port, cache)."""
    return ServeSettings(
        host="127.0.0.1",
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        max_batch_size=settings.max_batch_size,
        torch_threads=settings.torch_threads,
        request_timeout_ms=0.0,  # the baseline has no deadline either; slow runs must not turn into 504s
    )


async def _cascade(model_dir: Path, workdir: Path, settings: BenchSettings) -> CascadeResult | None:
    """The cascade row (``cascade.py``); ``None`` (said) without a fast model or requests."""
    fast_dir = Path(settings.cascade_fast_model) if settings.cascade_fast_model else BUNDLED_FAST
    if settings.cascade_requests == 0 or not (fast_dir / "config.json").exists():
        progress(f"cascade vs quality-only: skipped (no fast model at {fast_dir}, or no requests)")
        return None
    progress("cascade vs quality-only")
    return await measure_cascade(fast_dir, model_dir, workdir, _serve_base(settings), settings)


async def _bulk(
    model_dir: Path, workdir: Path, settings: BenchSettings, payloads: list[Payload]
) -> BulkResult | None:
    """Ours with the job API on a throw-away redis-server; ``None`` (said) without redis-server."""
    if shutil.which("redis-server") is None:
        progress("bulk vs interactive: skipped, no redis-server on PATH (`make redis-server`)")
        return None
    progress("bulk vs interactive")
    (workdir / "redis").mkdir(exist_ok=True)
    redis = RedisProcess(workdir / "redis")
    try:
        base = replace(_serve_base(settings), jobs_redis_url=redis.url)
        server = processes.start_ours(
            model_dir, workdir, cache=False, base=base, name="ours-jobs", env=settings.environment()
        )
        try:
            processes.wait_all_ready([server])
            return await measure_bulk(
                server.url,
                payloads,
                clients=settings.bulk_clients,
                requests=settings.bulk_requests,
                items=settings.bulk_items,
                rounds=settings.bulk_rounds,
            )
        finally:
            server.stop()
    finally:
        redis.stop()


@contextlib.contextmanager
def _servers(
    model_dir: Path, workdir: Path, settings: BenchSettings, *, extras: bool
) -> Iterator[tuple[processes.Server, processes.Server, processes.Server | None, processes.Server | None]]:
    """Ours (cache off) and the baseline; with ``extras`` also ours with its cache and a router in front
    of that one. They start in parallel; all are stopped on the way out."""
    base = _serve_base(settings)
    env = settings.environment()
    started: list[processes.Server] = []
    try:
        progress(f"starting servers for {model_dir.name}")
        ours = processes.start_ours(
            model_dir, workdir, cache=False, base=base, name=f"ours-{model_dir.name}", env=env
        )
        started.append(ours)
        naive = processes.start_baseline(
            model_dir,
            workdir,
            num_beams=settings.num_beams,
            max_new_tokens=settings.max_new_tokens,
            torch_threads=settings.torch_threads,
            name=f"naive-{model_dir.name}",
            env=env,
        )
        started.append(naive)
        cached = router = None
        if extras:
            cached = processes.start_ours(
                model_dir, workdir, cache=True, base=base, name="ours-cached", env=env
            )
            started.append(cached)
            router = processes.start_router(cached.url, workdir)
            started.append(router)
        processes.wait_all_ready(started)
        yield ours, naive, cached, router
    finally:
        for server in reversed(started):
            server.stop()
