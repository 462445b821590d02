"""``captionfleet bench``'s settings: one frozen dataclass, one documented default per field.

``--quick`` and ``--json`` are flags of the command (see ``command.py``); ``--quick`` replaces the sizes
below with :data:`QUICK`'s so that a quick run takes about 4 minutes on 2 cores (236-241 s idle, measured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from captionfleet.settings import setting

SHARE_CLIENTS = 32
"""Clients of the served run that served_share_of_offline_c32 compares with the offline pipeline."""


@dataclass(frozen=True)
class BenchSettings:
    model: str = setting(
        "", "Model directory (save_pretrained format) for the serving runs; empty: the bundled model."
    )
    larger_model: bool = setting(
        True,
        "Also run the serving comparison on a larger randomly initialised BLIP (see bench/models.py); "
        "never with --quick.",
    )
    concurrency: tuple[str, ...] = setting(
        ("1", "8", "32", "128"), "Concurrent clients of the serving runs, comma-separated."
    )
    requests: int = setting(
        128, "Requests per serving run (per server and concurrency); at least twice the concurrency."
    )
    steady_requests: int = setting(
        192,
        "Requests of each run measured for a ratio of its own at 32 clients: our server alone for "
        "served_share_of_offline_c32 (the offline pipeline captions as many images, at least 64) and each "
        "OOD-cost run (at least twice ood_concurrency). Six waves of 32, so that the first (nothing yet "
        "decoded ahead of the model) weighs a sixth, not a half.",
    )
    run_seconds: float = setting(
        30.0, "A serving run stops sending new requests after this many seconds (slow baselines)."
    )
    warmup_requests: int = setting(8, "Requests sent to each server before its first measured run.")
    num_beams: int = setting(3, "Beam width for both servers (captionfleet serve's default).")
    max_new_tokens: int = setting(
        30, "Most tokens per caption for the given model; the larger random model uses exactly 20."
    )
    max_batch_size: int = setting(32, "captionfleet serve's --max-batch-size in the serving runs.")
    torch_threads: int = setting(0, "Intra-op threads of both servers; 0: torch's default.")
    server_env: tuple[str, ...] = setting(
        (), "Extra environment of both servers, NAME=VALUE comma-separated (e.g. OMP_WAIT_POLICY=PASSIVE)."
    )
    image_side: int = setting(640, "Longer side of the JPEG photos sent in the serving runs, in pixels.")
    preprocess_megapixels: tuple[str, ...] = setting(
        ("1", "3", "12"), "Photo sizes of the preprocessing comparison, in megapixels."
    )
    preprocess_rounds: int = setting(3, "Times each photo is preprocessed per size and preprocessor.")
    cache_requests: int = setting(2000, "Requests of the cache-hit run (one image, cached).")
    cache_concurrency: int = setting(32, "Concurrent clients of the cache-hit run.")
    router_requests: int = setting(
        400, "Requests through the router and directly (each), one at a time, alternating in blocks."
    )
    bulk_clients: int = setting(
        8, "Interactive clients of the bulk comparison (with and without a job running)."
    )
    bulk_requests: int = setting(
        300, "Interactive requests per run of the bulk comparison (a round runs one alone, one with a job)."
    )
    bulk_rounds: int = setting(
        6,
        "Rounds of the bulk comparison, each an interactive run alone next to one with a job running; "
        "the p99 ratio is the median of the rounds' ratios.",
    )
    bulk_items: int = setting(
        64, "Items of the job measured alone; the job running under interactive load has eight times as many."
    )
    speed_model: str = setting(
        "blip-mini-random",
        "Random model of the decoder and int8 speed ratios (blip-tiny-random: smoke tests only).",
        choices=("blip-mini-random", "blip-tiny-random"),
    )
    agreement_scenes: int = setting(
        500, "Held-out scenes captioned by both decoders (and int8) for the agreement shares."
    )
    engine_rounds: int = setting(
        3, "Timed rounds of each engine measurement (offline pipeline, decoders, int8); best kept."
    )
    speed_rounds: int = setting(
        5,
        "Alternations of the decoder and int8 timings (native/transformers, fp32/int8 back to back); "
        "each ratio is the median of the rounds' ratios.",
    )
    ood_concurrency: int = setting(
        32, "Clients of the OOD-cost runs (ours with the out-of-distribution score, and without)."
    )
    ood_rounds: int = setting(4, "Alternating rounds per side of the OOD-cost runs; 0: skip them.")
    cascade_fast_model: str = setting(
        "",
        "Fast model of the cascade row (against --model as the quality one); empty: the bundled "
        "scenes-blip-fast, the row skipped without it.",
    )
    cascade_clients: int = setting(32, "Clients of the cascade row (cascade vs the quality model alone).")
    cascade_requests: int = setting(512, "Requests per side of the cascade row; 0: skip it.")
    cascade_scenes: int = setting(200, "Held-out scenes sent in the cascade row (exact match against them).")
    cascade_target_rate: float = setting(
        0.3, "Escalation rate the cascade row's threshold is calibrated for (the fast model's calibration)."
    )
    workdir: str = setting("", "Folder for generated models, photos and server logs; empty: a temp dir.")

    def concurrency_levels(self) -> list[int]:
        return [int(level) for level in self.concurrency]

    def environment(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.server_env)

    def megapixels(self) -> list[float]:
        return [float(size) for size in self.preprocess_megapixels]

    def check(self) -> list[str]:
        """Problems that make these settings unusable, as messages (empty: fine)."""
        problems = []
        try:
            if not self.concurrency or min(self.concurrency_levels()) < 1:
                problems.append("concurrency must list integers >= 1")
        except ValueError:
            problems.append(f"concurrency must list integers, got {','.join(self.concurrency)!r}")
        try:
            if not self.preprocess_megapixels or min(self.megapixels()) <= 0:
                problems.append("preprocess_megapixels must list numbers > 0")
        except ValueError:
            problems.append(f"preprocess_megapixels must list numbers, got {self.preprocess_megapixels!r}")
        for name in (
            "requests",
            "steady_requests",
            "num_beams",
            "max_new_tokens",
            "max_batch_size",
            "image_side",
            "preprocess_rounds",
            "cache_requests",
            "cache_concurrency",
            "router_requests",
            "bulk_clients",
            "bulk_requests",
            "bulk_rounds",
            "bulk_items",
            "agreement_scenes",
            "engine_rounds",
            "speed_rounds",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if any("=" not in entry or not entry.split("=", 1)[0] for entry in self.server_env):
            problems.append(f"server_env must list NAME=VALUE entries, got {','.join(self.server_env)!r}")
        if self.run_seconds <= 0:
            problems.append("run_seconds must be > 0")
        if self.warmup_requests < 0 or self.torch_threads < 0 or self.ood_rounds < 0:
            problems.append("warmup_requests, torch_threads and ood_rounds must be >= 0")
        if self.ood_concurrency < 1:
            problems.append("ood_concurrency must be >= 1")
        if self.cascade_clients < 1 or self.cascade_scenes < 1 or self.cascade_requests < 0:
            problems.append("cascade_clients and cascade_scenes must be >= 1, cascade_requests >= 0")
        if not 0 <= self.cascade_target_rate <= 1:
            problems.append("cascade_target_rate must be in [0, 1]")
        return problems

    def steady_count(self, concurrency: int) -> int:
        """Requests of a run of its own at ``concurrency`` clients (``steady_requests``, at least two
        waves); at :data:`SHARE_CLIENTS` also the offline pipeline's images."""
        return max(self.steady_requests, 2 * concurrency)

    def quick(self) -> BenchSettings:
        """These settings with :data:`QUICK`'s sizes where they were left at their defaults (so that
        ``--quick --requests 10`` still sends 10)."""
        defaults = BenchSettings()
        changes = {
            name: value for name, value in QUICK.items() if getattr(self, name) == getattr(defaults, name)
        }
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


QUICK: dict[str, object] = {
    "larger_model": False,
    "concurrency": ("1", "32"),
    "requests": 48,
    "run_seconds": 20.0,
    "warmup_requests": 4,
    "preprocess_megapixels": ("12",),
    "preprocess_rounds": 2,
    "cache_requests": 600,
    "router_requests": 150,
    "bulk_requests": 160,
    "bulk_rounds": 3,
    "bulk_items": 32,
    "agreement_scenes": 200,
    "ood_rounds": 2,
    "engine_rounds": 2,
    "speed_rounds": 3,
    "cascade_requests": 192,
    "cascade_scenes": 100,
}
"""What ``--quick`` changes: fewer requests, concurrency 1 and 32 only, no larger model, 12 MP only,
200 agreement scenes, 2 engine rounds, 3 speed rounds."""
