"""Prometheus metrics of one runtime, all named ``captionfleet_*`` and labelled by model version.

A registry per server (not the global one), so several servers in one process (tests) keep their own
counts. :class:`ServerMetrics` implements the data plane's observer protocol, so the batcher and the
service report their stages without knowing Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from captionfleet.runtime.engine.types import Caption
from captionfleet.runtime.serving.drift import DriftState
from captionfleet.runtime.web.metrics import Declared, ProcessMetrics


class ServerMetrics(ProcessMetrics):
    # In this order, the order of the exposition. What a client sees: answers by route and status, and
    # the latency of the captioned ones.
    requests = Declared.counter(
        "captionfleet_requests", "HTTP requests answered, by route and status code", "route", "code"
    )
    request_latency = Declared.histogram(
        "captionfleet_request_duration_seconds",
        "End-to-end latency of captioned requests (status 200), from arrival to response",
        "model",
        "route",
    )
    # Where a request's time goes inside the server (queue, preprocessing, model call), and the load.
    queue_wait = Declared.histogram(
        "captionfleet_queue_wait_seconds",
        "Time a request waited in the batcher's queue before its batch started",
        "model",
    )
    preprocess = Declared.histogram(
        "captionfleet_preprocess_seconds",
        "Decoding, cache key and preprocessing time per image (in the preprocessing pool)",
        "model",
    )
    inference = Declared.histogram(
        "captionfleet_inference_seconds", "Time of one batched model call", "model"
    )
    batch_size = Declared.histogram("captionfleet_batch_size", "Images per model call", "model")
    queue_depth_gauge = Declared.gauge("captionfleet_queue_depth", "Requests waiting for a batch", "model")
    in_flight = Declared.gauge(
        "captionfleet_requests_in_flight", "Caption requests being handled right now", "model"
    )
    jobs_pending_items = Declared.gauge(
        "captionfleet_jobs_pending_items",
        "Job items in the Redis stream not stored yet, over the fleet (queued, held, being captioned)",
        "model",
    )
    # The result cache and what the captions look like.
    cache_hits = Declared.counter("captionfleet_cache_hits", "Result cache hits", "model")
    cache_misses = Declared.counter("captionfleet_cache_misses", "Result cache misses", "model")
    confidence = Declared.histogram(
        "captionfleet_caption_confidence",
        "Confidence of the captions generated",
        "model",
        buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
    )
    caption_words = Declared.histogram(
        "captionfleet_caption_length_words",
        "Words per generated caption",
        "model",
        buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50),
    )
    # Out-of-distribution requests and the drift window (``serving/drift.py``).
    ood_requests = Declared.counter(
        "captionfleet_ood_requests",
        "Answered requests whose image was scored out of the model's distribution",
        "model",
    )
    feature_drift = Declared.gauge(
        "captionfleet_feature_drift",
        "Excess share of out-of-distribution requests in the drift window over the reference's own "
        "(0: like the reference; alert above 0.2)",
        "model",
    )
    confidence_window_mean = Declared.gauge(
        "captionfleet_confidence_window_mean",
        "Mean caption confidence over the drift window's requests",
        "model",
    )
    # Calls to the moderation service by outcome, their time, cached verdicts, unmoderated captions.
    moderation_checks = Declared.counter(
        "captionfleet_moderation_checks",
        "Calls to the moderation service by outcome: allowed, blocked, unavailable (down, slow, bad)",
        "model",
        "outcome",
    )
    moderation_latency = Declared.histogram(
        "captionfleet_moderation_duration_seconds", "Time of one call to the moderation service", "model"
    )
    moderation_cache_hits = Declared.counter(
        "captionfleet_moderation_cache_hits", "Moderation verdicts taken from the verdict cache", "model"
    )
    moderation_bypassed_total = Declared.counter(
        "captionfleet_moderation_bypassed",
        "Images captioned without a verdict: moderation unavailable under failure policy Ignore",
        "model",
    )
    # Which model is served, and whether it is ready.
    model_info = Declared.gauge(
        "captionfleet_model_info",
        "The model served (value 1), with its version, name, device and dtype",
        "model",
        "name",
        "device",
        "dtype",
    )
    ready = Declared.gauge("captionfleet_ready", "1 when the model is warm and the server not draining")

    def __init__(self, model_version: str, max_batch_size: int) -> None:
        # Powers of two up to the largest batch, and that size itself: no bucket the batcher cannot fill.
        batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size} & set(range(1, max_batch_size + 1)))
        super().__init__(buckets={"batch_size": [float(b) for b in batch_buckets]})
        self.model = model_version

    def watch_drift(self, state: Callable[[], DriftState]) -> None:
        """Export the drift window's figures; read when /metrics is rendered."""
        self.feature_drift.labels(self.model).set_function(lambda: state().drift)
        self.confidence_window_mean.labels(self.model).set_function(lambda: state().confidence_mean or 0.0)

    def describe_model(self, name: str, device: str, dtype: str) -> None:
        self.model_info.labels(model=self.model, name=name, device=device, dtype=dtype).set(1)

    # The data plane's observer protocols (BatchObserver, ServiceObserver, JobsObserver).
    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.labels(self.model).set(depth)

    def batch_done(self, size: int, queue_waits: Sequence[float], inference_s: float) -> None:
        self.batch_size.labels(self.model).observe(size)
        self.inference.labels(self.model).observe(inference_s)
        wait = self.queue_wait.labels(self.model)
        for seconds in queue_waits:
            wait.observe(seconds)

    def jobs_pending(self, items: int) -> None:
        self.jobs_pending_items.labels(self.model).set(items)

    def preprocessed(self, seconds: float) -> None:
        self.preprocess.labels(self.model).observe(seconds)

    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(self.model).inc()

    def answered(self, caption: Caption) -> None:
        if caption.in_distribution is False:
            self.ood_requests.labels(self.model).inc()

    def captioned(self, caption: Caption) -> None:
        self.confidence.labels(self.model).observe(caption.confidence)
        self.caption_words.labels(self.model).observe(len(caption.text.split()))

    # The moderation's observer protocol (ModerationObserver).
    def moderation_checked(self, outcome: str, seconds: float) -> None:
        self.moderation_checks.labels(self.model, outcome).inc()
        self.moderation_latency.labels(self.model).observe(seconds)

    def moderation_cache_hit(self) -> None:
        self.moderation_cache_hits.labels(self.model).inc()

    def moderation_bypassed(self) -> None:
        self.moderation_bypassed_total.labels(self.model).inc()
