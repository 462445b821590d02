"""``captionfleet serve``'s settings: one frozen dataclass, one documented default per field.

Every field is also a command-line option (``--max-batch-size``) and an environment variable
(``CAPTIONFLEET_MAX_BATCH_SIZE``). The operator sets these variables in the Deployments it builds,
deriving each name from the field (``captionfleet.settings.env_entries``), so the class lives here,
below both, with no dependency on the runtime. The edge's fields (listening, API keys, body and
header limits, deadline, drain) come from :class:`EdgeSettings`, the default generation options
from :class:`GenerationSettings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from captionfleet.settings import setting
from captionfleet.settings.edge import MB, EdgeSettings
from captionfleet.settings.generation import GenerationSettings

MODERATION_FAILURE_POLICIES = ("Fail", "Ignore")
"""What a failed moderation check does, named as Kubernetes' admission webhooks' failurePolicy."""


@dataclass(frozen=True)
class ServeSettings(EdgeSettings, GenerationSettings):
    model: str = setting(
        "",
        "Model: a save_pretrained directory, a file:// URL or a Hugging Face id; empty: the bundled model.",
    )
    model_version: str = setting(
        "", "Version reported in responses, metrics and cache keys; empty: derived from the model's files."
    )
    device: str = setting("auto", "Torch device (cpu, cuda, cuda:1); auto: CUDA when available, else CPU.")
    precision: str = setting(
        "auto",
        "Weights dtype (fp32, bf16, fp16 or long names); auto: bf16 on CUDA (else fp16), fp32 on CPU; "
        "int8: linear layers dynamically quantised to int8 (CPU only).",
        choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "int8"),
    )
    decoder: str = setting(
        "native",
        "Caption decoder: native (ours: batched beam search, preallocated cache; same captions) or "
        "transformers (model.generate).",
        choices=("native", "transformers"),
    )
    torch_threads: int = setting(
        0,
        "Intra-op threads for inference on the CPU; 0: the CPUs this process may use (affinity, capped by "
        "the cgroup quota, i.e. the pod's CPU limit). On CPUs shared with other busy processes, "
        "OMP_WAIT_POLICY=PASSIVE in the environment stops torch's threads spin-waiting.",
    )
    max_batch_size: int = setting(8, "Most images in one model call.")
    max_queue_delay_ms: float = setting(
        10.0, "Longest a request waits for companions, counted from the oldest waiting request."
    )
    max_bulk_batch_size: int = setting(
        0,
        "Most bulk items (job items, X-Priority: bulk) filling room in an interactive batch, and the size "
        "of the first bulk-only batch after interactive traffic (each next one doubles, up to "
        "max_batch_size): amid interactive traffic a request waits behind at most that much bulk work. "
        "0: max(1, max_batch_size // 16); on a GPU, where a batch's time hardly grows with its size, "
        "max_batch_size gives bulk work all the room.",
    )
    bulk_time_share: float = setting(
        0.1,
        "Most share of an interactive batch's predicted time (from the measured per-item cost) that bulk "
        "items filling its room may add; a share of an item carries over to the next batch. Amid steady "
        "interactive traffic bulk work gets about this share of the model, and an interactive request "
        "waits about that much longer (on a CPU a batch's time grows with its size; on a GPU, where it "
        "hardly does, bulk items fill the room). 0: bulk work only on an idle model.",
    )
    bulk_max_wait_ms: int = setting(
        2000,
        "Longest waiting bulk work goes without a turn amid interactive traffic: then one bulk batch of "
        "max_bulk_batch_size goes between two interactive batches, so that bulk work whose options differ "
        "from the traffic's (a quality gate's requests) or on a saturated model still progresses, and an "
        "interactive request waits behind at most that one batch. 0: bulk work waits for room or calm "
        "(it may wait for ever).",
    )
    bulk_prepare_concurrency: int = setting(
        1,
        "Bulk items decoded and preprocessed at once, each started only while no interactive request is "
        "being prepared: bulk decoding never queues ahead of an interactive request in the preprocessing "
        "pool, nor takes the CPU from it, by more than this many images. 0: no limit (bulk and "
        "interactive preparation compete).",
    )
    bulk_calm_of_a_batch: bool = setting(
        True,
        "A bulk-only batch amid interactive traffic starts only once no interactive request arrived or "
        "was answered for as long as the last batch took (at least max_queue_delay_ms): the clients of "
        "the last batch come back within about that, over a real network too, and a bulk batch started "
        "in the gap would hold them up. False: max_queue_delay_ms of calm only.",
    )
    idle_dispatch: bool = setting(
        True,
        "The idle fast path: a free model runs the oldest group at once when it holds its companions: "
        "the last batch's requests and those of its options that arrived while it ran (one client's "
        "latency gets no max_queue_delay_ms added).",
    )
    wait_for_arrivals: bool = setting(
        True,
        "A free model whose queue holds fewer than its companions (see idle_dispatch) waits "
        "max_queue_delay_ms for the rest to come back, longer while they keep arriving or are being "
        "decoded (at most one batch's duration), so that closed-loop clients do not split into a large "
        "and a small batch in turn.",
    )
    max_queue_size: int = setting(
        256, "Requests waiting for the model before new ones get 503 + Retry-After."
    )
    max_pixels: int = setting(
        40_000_000, "Largest width*height, checked before decoding (decompression bombs -> 400)."
    )
    max_batch_images: int = setting(32, "Most images in one POST /v1/caption/batch.")
    preprocess_workers: int = setting(
        0, "Threads that decode and preprocess images off the event loop; 0: min(4, CPU count)."
    )
    redis_url: str = setting(
        "", "redis://host:port/db for a result cache shared by replicas; empty: an in-memory LRU per process."
    )
    cache_size: int = setting(10000, "Entries in the in-memory result cache; 0 turns caching off.")
    cache_ttl_s: float = setting(3600.0, "Seconds a cached caption stays valid (memory and Redis).")
    rate_limit_rps: float = setting(
        0.0, "Requests per second allowed per API key (token bucket); 0: no limit."
    )
    rate_limit_burst: int = setting(0, "Token bucket size per API key; 0: max(1, rate_limit_rps).")
    allow_private_urls: bool = setting(
        False,
        "Let {'url': ...} fetch loopback, private, link-local and multicast addresses (SSRF guard off).",
    )
    url_timeout_s: float = setting(10.0, "Total time allowed to fetch an image URL, redirects included.")
    url_max_bytes: int = setting(20 * MB, "Largest image fetched from a URL (413 beyond).")
    url_max_redirects: int = setting(5, "Redirects followed when fetching an image URL, each re-checked.")
    moderation_url: str = setting(
        "",
        "Moderation service: before captioning, each image is POSTed to it as JPEG (image/jpeg, longest "
        'side at most 512 px), answered {"allowed": bool, "reason": str}; not allowed -> 422 '
        "content_blocked, never captioned. Checked like image URLs (no private addresses unless "
        "moderation_allow_private or allow_private_urls). Empty: no moderation.",
    )
    moderation_timeout_ms: float = setting(
        2000.0,
        "Longest wait for a moderation verdict (within the request's deadline); slower counts as the "
        "service being unavailable.",
    )
    moderation_failure_policy: str = setting(
        "Fail",
        "When the moderation service is down, slow or answers malformed JSON: Fail -> 503 "
        "moderation_unavailable with Retry-After; Ignore -> the image is captioned unmoderated (counted in "
        "captionfleet_moderation_bypassed_total).",
        choices=MODERATION_FAILURE_POLICIES,
    )
    moderation_allow_private: bool = setting(
        False,
        "Let moderation_url be a loopback, private or link-local address (an in-cluster Service), without "
        "opening image URLs to them as allow_private_urls does.",
    )
    moderation_cache_size: int = setting(
        10000,
        "Moderation verdicts kept in memory by the image's perceptual key (the result cache's), so a "
        "repeated image is not sent again; 0: every image is sent.",
    )
    moderation_cache_ttl_s: float = setting(3600.0, "Seconds a cached moderation verdict stays valid.")
    moderation_max_connections: int = setting(
        32, "Connections open to the moderation service at once; further checks wait within the timeout."
    )
    style: str = setting("", "Default style preset for requests that name none (e.g. concise); empty: none.")
    ood: bool = setting(
        True,
        "Score every image's distance to the model's reference images (ood_score, in_distribution, "
        "drift); off: no scores, no drift.",
    )
    ood_threshold: float = setting(
        0.99,
        "ood_score above which an image is out of distribution (a quantile of the reference's own "
        "scores: about 1 - threshold of in-distribution images are flagged).",
    )
    ood_reference_requests: int = setting(
        500,
        "A model without ood_reference.safetensors builds its reference from its first N captioned "
        "images (no ood fields until then; GET /v1/models says so); 0: never.",
    )
    drift_window: int = setting(200, "Scored requests in the drift window (the most recent ones).")
    drift_significance: float = setting(
        0.01, "p-value below which the window's out-of-distribution share counts as drift."
    )
    jobs_redis_url: str = setting(
        "",
        "redis://host:port/db holding the job API's queue (a stream with a consumer group), job state and "
        "results; every replica on it consumes bulk items with its spare capacity. Empty: no job API (503).",
    )
    jobs_stream: str = setting(
        "captionfleet:jobs",
        "Redis stream of the job items; job state and results use it as their key prefix. One per model "
        "version, so that each version captions the jobs sent to it.",
    )
    jobs_max_items: int = setting(10000, "Most items in one POST /v1/jobs (400 beyond).")
    jobs_result_ttl_s: float = setting(
        86400.0, "Seconds a job's state and results stay in Redis, from its creation and again once it ends."
    )
    jobs_claim_timeout_s: float = setting(
        60.0,
        "Seconds an item may stay unacknowledged by a replica that stopped renewing it (it died) before "
        "another replica claims it (XAUTOCLAIM); live replicas renew theirs every third of it.",
    )
    jobs_prefetch: int = setting(
        0,
        "Job items one replica holds at once (decoding, queued as bulk, on the model); 0: 2*max_batch_size.",
    )
    jobs_webhook_secret: str = setting(
        "",
        "Key of the HMAC-SHA256 signature of webhook bodies (X-Captionfleet-Signature: sha256=<hex>) for "
        "jobs that bring no webhook_secret of their own; empty: those go unsigned.",
    )
    jobs_webhook_retries: int = setting(5, "Retries of a webhook that failed (no answer, or not 2xx).")
    jobs_webhook_backoff_s: float = setting(
        1.0, "Seconds before a webhook's first retry; each further retry waits twice as long."
    )
    jobs_webhook_timeout_s: float = setting(10.0, "Time allowed for one webhook POST.")
    jobs_webhook_concurrency: int = setting(
        16,
        "Webhooks one replica delivers (or holds for a retry) at once, one connection each; the rest wait "
        "in the Redis stream of webhooks for any replica.",
    )

    def resolved_preprocess_workers(self) -> int:
        return self.preprocess_workers if self.preprocess_workers > 0 else min(4, os.cpu_count() or 1)

    def resolved_max_bulk_batch_size(self) -> int:
        if self.max_bulk_batch_size > 0:
            return min(self.max_bulk_batch_size, self.max_batch_size)
        return max(1, self.max_batch_size // 16)

    def resolved_jobs_prefetch(self) -> int:
        return self.jobs_prefetch if self.jobs_prefetch > 0 else 2 * self.max_batch_size

    def resolved_rate_limit_burst(self) -> int:
        return self.rate_limit_burst if self.rate_limit_burst > 0 else max(1, round(self.rate_limit_rps))

    def check(self) -> list[str]:
        """Problems that make these settings unusable, as messages (empty: fine)."""
        problems = super().check()
        positive = (
            "max_batch_size",
            "max_queue_size",
            "max_pixels",
            "max_batch_images",
            "jobs_max_items",
            "jobs_result_ttl_s",
            "jobs_claim_timeout_s",
            "jobs_webhook_timeout_s",
            "jobs_webhook_concurrency",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in (
            "max_queue_delay_ms",
            "cache_ttl_s",
            "rate_limit_rps",
            "jobs_prefetch",
            "max_bulk_batch_size",
            "bulk_time_share",
            "bulk_prepare_concurrency",
            "bulk_max_wait_ms",
            "jobs_webhook_retries",
            "jobs_webhook_backoff_s",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.url_timeout_s <= 0 or self.url_max_bytes <= 0 or self.url_max_redirects < 0:
            problems.append("url_timeout_s and url_max_bytes must be > 0, url_max_redirects >= 0")
        problems += self._ood_problems()
        problems += self._moderation_problems()
        if self.precision == "int8" and self.device.startswith("cuda"):
            problems.append("precision int8 runs on the CPU only; use bf16 or fp16 on a GPU")
        return problems

    def _ood_problems(self) -> list[str]:
        problems = []
        for name in ("no_repeat_ngram_size", "ood_no_repeat_ngram_size"):
            if not 0 <= getattr(self, name) <= 10:
                problems.append(f"{name} must be between 0 and 10")
        if not 0.0 < self.ood_threshold < 1.0:
            problems.append("ood_threshold must be in (0, 1)")
        if self.ood_reference_requests != 0 and self.ood_reference_requests < 30:
            problems.append("ood_reference_requests must be 0 or at least 30")
        if self.drift_window < 1:
            problems.append("drift_window must be >= 1")
        if not 0.0 < self.drift_significance < 1.0:
            problems.append("drift_significance must be in (0, 1)")
        return problems

    def _moderation_problems(self) -> list[str]:
        problems = []
        url = self.moderation_url.strip().lower()
        if url and not url.startswith(("http://", "https://")):
            problems.append("moderation_url must be an http:// or https:// URL")
        if self.moderation_failure_policy not in MODERATION_FAILURE_POLICIES:
            policies = ", ".join(MODERATION_FAILURE_POLICIES)
            problems.append(f"moderation_failure_policy must be one of {policies}")
        if self.moderation_timeout_ms <= 0 or self.moderation_max_connections < 1:
            problems.append("moderation_timeout_ms must be > 0 and moderation_max_connections >= 1")
        if self.moderation_cache_size < 0 or self.moderation_cache_ttl_s <= 0:
            problems.append("moderation_cache_size must be >= 0 and moderation_cache_ttl_s > 0")
        return problems
