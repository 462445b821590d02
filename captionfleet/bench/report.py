"""The benchmark's outputs: one JSON object for machines, a table for people.

The headline keys (always present; ``null`` when that part was not measured):
- ``preprocess_ratio_12mp``: ours / ``BlipImageProcessor`` images per second on 12 MP JPEGs, at the
  served model's input size (``preprocess_ratio_12mp_384``: at BLIP-base's 384 px);
- ``serve_ratio_c32``, ``serve_p99_ms_c32``: our throughput over the naive server's, and our p99, at
  32 concurrent clients on the served model (the first model);
- ``cache_hit_rps`` (and ``cache_hit_p50_ms``): the cache-hit path;
- ``router_overhead_ms_p50``: the median latency the router hop adds;
- ``offline_rps_c32``: the offline pipeline's images per second (decode + preprocess + batched
  captioning, no HTTP, at the server's batch size, of ``steady_count`` images; ``engine.py``), and
  ``served_share_of_offline_c32``: over it, our server's throughput in a run of its own at 32 clients
  of as many requests (``served_at_32``: six waves by default, where the comparison rows may be two);
- ``loadgen_cpu_share_c32``: the load generator's share of the machine's CPU time during our run at 32
  clients (it runs on the same CPUs as the server; ``served_share_of_offline_c32`` is not corrected
  for it), ``loadgen_ms_per_request_c32`` its CPU time per answer;
- ``c1_p50_ms``: our p50 at one client, against ``engine_bs1_ms``, one preprocessed image's caption;
- ``decoder_speedup_bs32``, ``decoder_speedup_bs1``: the native decoder over transformers' generate on
  ``blip-mini-random`` (beam 3, 20 tokens); ``decoder_agreement``: share of identical captions of the
  two on the bundled model's held-out scenes;
- ``int8_speedup`` (``blip-mini-random``, batch 8) and ``int8_agreement`` (held-out scenes, vs fp32);
- ``fast_speedup_bs8``: the bundled fast model's engine throughput over the quality model's, batch 8,
  served options (``tiers.py``);
- ``bulk_p99_ratio_c8``: interactive p99 at 8 clients with a job running over it without one (the median
  of side-by-side rounds' ratios), and
  ``bulk_share_under_load``: the job's items per second under that load over its rate alone (``jobs.py``).
- ``cascade_throughput_ratio_c32``: the cascade's served throughput (the fast model first, the quality
  model for unsure answers) over the quality model's alone at 32 clients on the same CPUs, and
  ``cascade_exact_match_ratio``, ``cascade_escalation_rate`` (``cascade.py``);
- ``ood_cost_c32``: the share of served throughput the out-of-distribution score costs at 32 clients
  (1 - scored / ``--ood false``; ``ood.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from captionfleet.bench.cascade import CascadeResult
from captionfleet.bench.jobs import BulkResult
from captionfleet.bench.loadgen import LoadResult
from captionfleet.bench.preprocess import BLIP_BASE_SIDE
from captionfleet.bench.suite import BenchResults


def _number(value: float | None, digits: int = 2) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def served_share(results: BenchResults) -> float | None:
    """Our server's own run at 32 clients over the offline pipeline's images per second."""
    offline = results.engine.offline_rps if results.engine else None
    return results.served_at_32.throughput / offline if results.served_at_32 and offline else None


def headline(results: BenchResults) -> dict[str, float | None]:
    served = results.serving[0].model if results.serving else None
    preprocess = {(row.megapixels, row.side): row.ratio for row in results.preprocess}
    sides = sorted({row.side for row in results.preprocess if row.side != BLIP_BASE_SIDE})
    model_side = sides[0] if sides else BLIP_BASE_SIDE
    at_32 = next((row for row in results.serving if row.model == served and row.concurrency == 32), None)
    at_1 = next((row for row in results.serving if row.model == served and row.concurrency == 1), None)
    engine = results.engine
    offline = engine.offline_rps if engine else None
    share = served_share(results)
    return {
        "preprocess_ratio_12mp": _number(preprocess.get((12.0, model_side))),
        "preprocess_ratio_12mp_384": _number(preprocess.get((12.0, BLIP_BASE_SIDE))),
        "serve_ratio_c32": _number(at_32.ratio if at_32 else None),
        "serve_p99_ms_c32": _number(at_32.ours.percentile_ms(99) if at_32 else None, 1),
        "serve_naive_p99_ms_c32": _number(at_32.naive.percentile_ms(99) if at_32 else None, 1),
        "cache_hit_rps": _number(results.cache.throughput if results.cache else None, 1),
        "cache_hit_p50_ms": _number(results.cache.percentile_ms(50) if results.cache else None),
        "router_overhead_ms_p50": _number(results.router.overhead_ms(50) if results.router else None, 3),
        "offline_rps_c32": _number(offline, 1),
        "served_share_of_offline_c32": _number(share, 3),
        "loadgen_cpu_share_c32": _number(at_32.ours.cpu_share if at_32 else None, 4),
        "loadgen_ms_per_request_c32": _number(
            1000 * at_32.ours.cpu_s / at_32.ours.ok if at_32 and at_32.ours.ok else None, 3
        ),
        "c1_p50_ms": _number(at_1.ours.percentile_ms(50) if at_1 else None, 1),
        "engine_bs1_ms": _number(engine.engine_bs1_ms if engine else None, 1),
        "decoder_speedup_bs32": _number(engine.decoder_speedup.get(32) if engine else None),
        "decoder_speedup_bs1": _number(engine.decoder_speedup.get(1) if engine else None),
        "decoder_agreement": _number(engine.decoder_agreement if engine else None, 4),
        "int8_speedup": _number(engine.int8_speedup if engine else None),
        "int8_agreement": _number(engine.int8_agreement if engine else None, 4),
        "fast_speedup_bs8": _number(engine.fast_speedup if engine else None),
        "bulk_p99_ratio_c8": _number(results.bulk.p99_ratio if results.bulk else None, 3),
        "bulk_share_under_load": _number(results.bulk.bulk_share if results.bulk else None, 3),
        "ood_cost_c32": _number(results.ood.cost if results.ood else None, 4),
        "cascade_throughput_ratio_c32": _number(results.cascade.ratio if results.cascade else None, 3),
        "cascade_exact_match_ratio": _number(
            results.cascade.exact_match_ratio if results.cascade else None, 4
        ),
        "cascade_escalation_rate": _number(
            results.cascade.cascade.summary()["escalation_rate"] if results.cascade else None, 4
        ),
    }


def to_json(results: BenchResults) -> dict[str, Any]:
    return {
        **headline(results),
        "quick": results.quick,
        "elapsed_s": round(results.elapsed_s, 1),
        "machine": results.machine,
        "models": results.models,
        "preprocess": [row.summary() for row in results.preprocess],
        "serving": [row.summary() for row in results.serving],
        "served_at_32": results.served_at_32.summary() if results.served_at_32 else None,
        "cache": results.cache.summary() if results.cache else None,
        "router": results.router.summary() if results.router else None,
        "bulk": results.bulk.summary() if results.bulk else None,
        "engine": results.engine.summary() if results.engine else None,
        "ood": results.ood.summary() if results.ood else None,
        "cascade": results.cascade.summary() if results.cascade else None,
        "settings": dataclasses.asdict(results.settings),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def to_table(results: BenchResults) -> str:
    lines = _header_lines(results) + _serving_lines(results) + _other_lines(results)
    lines += ["", "Headline:"]
    lines += [f"  {key} = {_fmt(value, 2)}" for key, value in headline(results).items()]
    return "\n".join(lines)


def _header_lines(results: BenchResults) -> list[str]:
    machine = results.machine
    lines = [
        f"captionfleet bench{' --quick' if results.quick else ''}: {machine.get('cpus')} CPUs, "
        f"torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
        f"load average {machine.get('load_average_at_start')} at start, "
        f"{machine.get('load_average_at_end')} at the end; {results.elapsed_s:.0f} s",
        "All pairs measured side by side in this run; ratios are ours / the alternative.",
        "",
        "Preprocessing: JPEG bytes -> pixel tensor, one core (ours vs BlipImageProcessor)",
        f"  {'MP':>5} {'input':>6} {'ours img/s':>11} {'HF img/s':>9} {'ratio':>7} {'max |diff|':>11}",
    ]
    for row in results.preprocess:
        lines.append(
            f"  {row.megapixels:>5g} {row.side:>6} {row.ours_ips:>11.1f} {row.reference_ips:>9.1f} "
            f"{row.ratio:>6.1f}x {row.max_abs_diff:>11.3f}"
        )
    return lines


def _serving_lines(results: BenchResults) -> list[str]:
    lines: list[str] = []
    for name, description in results.models.items():
        serving_rows = [row for row in results.serving if row.model == name]
        if not serving_rows:
            continue
        lines += [
            "",
            "Serving: captionfleet serve vs naive server (one at a time, BlipProcessor + generate)",
            f"  model {description}",
            f"  {'clients':>7} | {'ours req/s':>10} {'p50':>7} {'p95':>7} {'p99 ms':>7} | "
            f"{'naive req/s':>11} {'p50':>7} {'p95':>7} {'p99 ms':>7} | {'ratio':>6}",
        ]
        for serving in serving_rows:
            ours, naive = serving.ours, serving.naive
            lines.append(
                f"  {serving.concurrency:>7} | {_load_cells(ours, 10)} | {_load_cells(naive, 11)} | "
                f"{_fmt(serving.ratio, 2):>5}x"
            )
            for label, result in (("ours", ours), ("naive", naive)):
                if result.ok != result.sent:
                    lines.append(
                        f"  {'':>7}   {label}: {result.sent - result.ok} of {result.sent} not 200: "
                        f"{dict(result.statuses)} {dict(result.failures)}"
                    )
    return lines


def _load_cells(result: LoadResult, width: int) -> str:
    """One server's cells of a serving row: requests/s in ``width`` columns, then p50, p95, p99 (ms)."""
    percentiles = " ".join(f"{_fmt(result.percentile_ms(p)):>7}" for p in (50, 95, 99))
    return f"{result.throughput:>{width}.2f} {percentiles}"


def _other_lines(results: BenchResults) -> list[str]:
    """Cache hits, the router's hop and the engine without HTTP."""
    lines: list[str] = []
    if results.cache is not None:
        cache = results.cache
        lines += [
            "",
            f"Cache hits: {cache.throughput:.0f} req/s, p50 {_fmt(cache.percentile_ms(50), 2)} ms, "
            f"p99 {_fmt(cache.percentile_ms(99), 2)} ms ({cache.concurrency} clients; "
            f"{cache.cached} of {cache.sent} answered from the cache)",
        ]
    if results.router is not None:
        router = results.router
        lines.append(
            f"Router hop: p50 {_fmt(router.direct.percentile_ms(50), 2)} ms direct, "
            f"{_fmt(router.routed.percentile_ms(50), 2)} ms routed: {router.overhead_ms(50):+.2f} ms "
            f"({router.direct.sent} requests each way, one at a time)"
        )
    if results.bulk is not None:
        lines += _bulk_lines(results.bulk)
    if results.engine is not None:
        engine = results.engine
        lines += [
            "",
            f"Engine, no HTTP: offline pipeline {engine.offline_rps:.1f} img/s (decode + preprocess + "
            f"caption, batches of {results.settings.max_batch_size}, {engine.offline_images} images); "
            f"one image {engine.engine_bs1_ms:.1f} ms",
            f"  native decoder vs transformers' generate on {engine.speed_model} (beam 3, 20 tokens): "
            + ", ".join(f"x{v:.2f} at batch {k}" for k, v in engine.decoder_speedup.items())
            + f"; identical captions on {engine.scenes} held-out scenes: {engine.decoder_agreement:.1%}",
            f"  int8 vs fp32: x{engine.int8_speedup:.2f} at batch 8; identical captions: "
            f"{engine.int8_agreement:.1%}",
            f"  fast model vs quality model: x{engine.fast_speedup:.2f} at batch 8 (beam 3, 30 tokens)",
        ]
        share = served_share(results)
        if results.served_at_32 is not None and share is not None:
            served = results.served_at_32
            lines.append(
                f"  served at 32 clients ({served.sent} requests): {served.throughput:.1f} req/s, "
                f"{share:.1%} of the offline pipeline"
            )
    if results.ood is not None:
        ood = results.ood
        lines += [
            "",
            f"OOD score: {ood.scored_rps:.2f} req/s scored, {ood.unscored_rps:.2f} req/s with --ood false "
            f"at {ood.concurrency} clients ({len(ood.scored)} rounds each): cost {ood.cost:+.1%}",
        ]
    if results.cascade is not None:
        lines += _cascade_lines(results.cascade)
    return lines


def _cascade_lines(result: CascadeResult) -> list[str]:
    cascade, quality = result.cascade.summary(), result.quality.summary()
    return [
        "",
        f"Cascade vs quality-only at {result.clients} clients (threshold {result.threshold}, from "
        f"{result.threshold_from}): {cascade['throughput_rps']:.2f} vs {quality['throughput_rps']:.2f} "
        f"req/s = x{result.ratio:.2f}; p99 {cascade['p99_ms']} vs {quality['p99_ms']} ms",
        f"  exact match {cascade['exact_match']:.1%} vs {quality['exact_match']:.1%} "
        f"({result.exact_match_ratio:.1%} of quality-only), escalated {cascade['escalation_rate']:.1%}",
    ]


def _bulk_lines(bulk: BulkResult) -> list[str]:
    idle, busy = bulk.interactive
    ratios = ", ".join(f"{ratio:.2f}" for ratio in bulk.round_ratios)
    return [
        "",
        f"Bulk vs interactive ({idle.concurrency} interactive clients, {len(bulk.round_ratios)} rounds of "
        f"{idle.sent // max(1, len(bulk.idle_rounds))} requests a side): p99 {_fmt(idle.percentile_ms(99))} "
        f"ms alone, {_fmt(busy.percentile_ms(99))} ms with a job running (x{bulk.p99_ratio:.2f}, the "
        f"median of the rounds' {ratios}; p50 {_fmt(idle.percentile_ms(50))} -> "
        f"{_fmt(busy.percentile_ms(50))} ms)",
        f"  job alone {bulk.bulk_idle_rps:.1f} items/s; under interactive load {bulk.bulk_busy_rps:.1f} "
        f"items/s ({bulk.bulk_share:.1%} of alone)"
        + ("" if bulk.busy_job_outlasted else "; the job ended before an interactive run did"),
    ]
