"""Prometheus metrics of one runtime, all named ``captionfleet_*`` and labelled by model version.

A registry per server (not the global one), so several servers in one process (tests) keep their own
counts. :class:`ServerMetrics` implements the data plane's observer protocol, so the batcher and the
service report their stages without knowing Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from captionfleet.runtime.engine.types import Caption
from captionfleet.runtime.serving.drift import DriftState
from captionfleet.runtime.web.metrics import ProcessMetrics


class ServerMetrics(ProcessMetrics):
    def __init__(self, model_version: str, max_batch_size: int) -> None:
        super().__init__()
        self.model = model_version
        # In this order, the order of the exposition: the request, its way through the batcher, the model.
        self._request_metrics()
        self._pipeline_metrics(max_batch_size)
        self._model_metrics()
        self._moderation_metrics()

    def _request_metrics(self) -> None:
        """What a client sees: answers by route and status, and the latency of the captioned ones."""
        self.requests = self.counter(
            "captionfleet_requests",
            "HTTP requests answered, by route and status code",
            ["route", "code"],
        )
        self.request_latency = self.histogram(
            "captionfleet_request_duration_seconds",
            "End-to-end latency of captioned requests (status 200), from arrival to response",
            ["model", "route"],
        )

    def _pipeline_metrics(self, max_batch_size: int) -> None:
        """Where a request's time goes inside the server (queue, preprocessing, model call), and the load."""
        self.queue_wait = self.histogram(
            "captionfleet_queue_wait_seconds",
            "Time a request waited in the batcher's queue before its batch started",
            ["model"],
        )
        self.preprocess = self.histogram(
            "captionfleet_preprocess_seconds",
            "Decoding, cache key and preprocessing time per image (in the preprocessing pool)",
            ["model"],
        )
        self.inference = self.histogram(
            "captionfleet_inference_seconds",
            "Time of one batched model call",
            ["model"],
        )
        # Powers of two up to the largest batch, and that size itself: no bucket the batcher cannot fill.
        batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size} & set(range(1, max_batch_size + 1)))
        self.batch_size = self.histogram(
            "captionfleet_batch_size",
            "Images per model call",
            ["model"],
            buckets=[float(b) for b in batch_buckets],
        )
        self.queue_depth_gauge = self.gauge(
            "captionfleet_queue_depth", "Requests waiting for a batch", ["model"]
        )
        self.in_flight = self.gauge(
            "captionfleet_requests_in_flight",
            "Caption requests being handled right now",
            ["model"],
        )

    def _model_metrics(self) -> None:
        """The result cache, what the captions look like, and which model is served (and if it is ready)."""
        self.cache_hits = self.counter("captionfleet_cache_hits", "Result cache hits", ["model"])
        self.cache_misses = self.counter("captionfleet_cache_misses", "Result cache misses", ["model"])
        self.confidence = self.histogram(
            "captionfleet_caption_confidence",
            "Confidence of the captions generated",
            ["model"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
        )
        self.caption_words = self.histogram(
            "captionfleet_caption_length_words",
            "Words per generated caption",
            ["model"],
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50),
        )
        self.model_info = self.gauge(
            "captionfleet_model_info",
            "The model served (value 1), with its version, name, device and dtype",
            ["model", "name", "device", "dtype"],
        )
        self.ready = self.gauge("captionfleet_ready", "1 when the model is warm and the server not draining")
        self._ood_metrics()

    def _ood_metrics(self) -> None:
        """Out-of-distribution requests and the drift window (``serving/drift.py``)."""
        self.ood_requests = self.counter(
            "captionfleet_ood_requests",
            "Answered requests whose image was scored out of the model's distribution",
            ["model"],
        )
        self.feature_drift = self.gauge(
            "captionfleet_feature_drift",
            "Excess share of out-of-distribution requests in the drift window over the reference's own "
            "(0: like the reference; alert above 0.2)",
            ["model"],
        )
        self.confidence_window_mean = self.gauge(
            "captionfleet_confidence_window_mean",
            "Mean caption confidence over the drift window's requests",
            ["model"],
        )

    def watch_drift(self, state: Callable[[], DriftState]) -> None:
        """Export the drift window's figures; read when /metrics is rendered."""
        self.feature_drift.labels(self.model).set_function(lambda: state().drift)
        self.confidence_window_mean.labels(self.model).set_function(lambda: state().confidence_mean or 0.0)

    def _moderation_metrics(self) -> None:
        """Calls to the moderation service by outcome, their time, cached verdicts, unmoderated captions."""
        self.moderation_checks = self.counter(
            "captionfleet_moderation_checks",
            "Calls to the moderation service by outcome: allowed, blocked, unavailable (down, slow, bad)",
            ["model", "outcome"],
        )
        self.moderation_latency = self.histogram(
            "captionfleet_moderation_duration_seconds",
            "Time of one call to the moderation service",
            ["model"],
        )
        self.moderation_cache_hits = self.counter(
            "captionfleet_moderation_cache_hits",
            "Moderation verdicts taken from the verdict cache",
            ["model"],
        )
        self.moderation_bypassed_total = self.counter(
            "captionfleet_moderation_bypassed",
            "Images captioned without a verdict: moderation unavailable under failure policy Ignore",
            ["model"],
        )

    def describe_model(self, name: str, device: str, dtype: str) -> None:
        self.model_info.labels(model=self.model, name=name, device=device, dtype=dtype).set(1)

    # The data plane's observer protocol (BatchObserver, ServiceObserver).
    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.labels(self.model).set(depth)

    def batch_done(self, size: int, queue_waits: Sequence[float], inference_s: float) -> None:
        self.batch_size.labels(self.model).observe(size)
        self.inference.labels(self.model).observe(inference_s)
        wait = self.queue_wait.labels(self.model)
        for seconds in queue_waits:
            wait.observe(seconds)

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
