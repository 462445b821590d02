"""What ``captionfleet serve`` and ``captionfleet router`` share at the HTTP edge: one settings base.

Both processes listen, check API keys, bound what clients may send and drain the same way
(``captionfleet.runtime.web``), so these fields, their defaults and their environment variables
(``CAPTIONFLEET_<FIELD>``) are the same on both. Every limit has a documented default.
"""

from __future__ import annotations

from dataclasses import dataclass

from captionfleet.settings import setting

MB = 1024 * 1024


@dataclass(frozen=True)
class EdgeSettings:
    host: str = setting("0.0.0.0", "Address to listen on (0.0.0.0: all interfaces, as in a container).")
    port: int = setting(8080, "TCP port to listen on (0: any free port, logged).")
    api_keys_file: str = setting(
        "", "File with one API key per line (or sha256:<hex> of one); # starts a comment. Empty: none."
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "API keys, comma-separated, taken whole (no comments; prefer the environment variable to the "
        "option); none: open.",
    )
    auth_failure_rps: float = setting(
        1.0,
        "Failed API-key attempts per second allowed per client address (token bucket) before 429; "
        "0: no limit.",
    )
    auth_failure_burst: int = setting(20, "Failed API-key attempts a client address may make in a row.")
    max_body_bytes: int = setting(
        20 * MB, "Largest request body; larger gets 413 without being read into memory."
    )
    max_body_bytes_in_flight: int = setting(
        256 * MB,
        "Request-body bytes held in memory at once over all requests; a body that does not fit waits "
        "(within its deadline, at most body_wait_ms), then gets 503 + Retry-After. Bounds peak memory "
        "whatever the concurrency; at least max_body_bytes.",
    )
    jobs_max_bytes: int = setting(
        64 * MB,
        "Largest POST /v1/jobs body (413 beyond); counts against max_body_bytes_in_flight. The router holds "
        "it whole, to send it again on the retry: keep the router's at least the runtimes'.",
    )
    body_wait_ms: float = setting(
        2000.0, "Longest a request body waits for room under max_body_bytes_in_flight before 503."
    )
    request_timeout_ms: float = setting(
        30000.0,
        "Deadline per request, from its arrival to its answer (queue and body reading included; the "
        "router's retry too, the rest passed on to the runtime in X-Request-Timeout-Ms); a client's "
        "X-Request-Timeout-Ms may only shorten it; past it the answer is 504. 0: none.",
    )
    header_timeout_ms: float = setting(
        10000.0,
        "Longest a client may take to send a request's line and headers, from its first byte (slow "
        "clients hold a connection: slowloris); then 408 and the connection is closed.",
    )
    max_header_bytes: int = setting(
        8190, "Longest request line, header name or header value in bytes; longer gets 400."
    )
    max_headers: int = setting(128, "Most header lines in one request; more gets 400.")
    max_form_fields: int = setting(
        64,
        "Most multipart parts besides the images in one request body (options, webhook, unknown "
        "fields); more gets 400 (each part costs parsing: thousands of tiny ones would keep a core busy).",
    )
    drain_grace_s: float = setting(
        30.0, "On SIGTERM: /readyz turns 503 at once; how long the process may take to finish before exit."
    )
    log_level: str = setting("info", "Logging level.", choices=("debug", "info", "warning", "error"))

    def check(self) -> list[str]:
        """Problems that make these settings unusable, as messages (empty: fine)."""
        problems = []
        for name in (
            *("max_body_bytes", "max_body_bytes_in_flight", "jobs_max_bytes"),
            *("max_header_bytes", "max_headers", "max_form_fields"),
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in ("request_timeout_ms", "drain_grace_s", "auth_failure_rps", "body_wait_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.header_timeout_ms <= 0:
            problems.append("header_timeout_ms must be > 0")
        if self.auth_failure_burst < 1:
            problems.append("auth_failure_burst must be >= 1")
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            problems.append("max_body_bytes_in_flight must be >= max_body_bytes")
        if self.jobs_max_bytes > self.max_body_bytes_in_flight:
            problems.append("jobs_max_bytes must be <= max_body_bytes_in_flight")
        if not 0 <= self.port < 65536:
            problems.append("port must be in 0..65535 (0: any free port)")
        return problems
