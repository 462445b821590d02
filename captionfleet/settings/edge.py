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
        "API keys, comma-separated (prefer the environment variable to the option); none: open.",
    )
    max_body_bytes: int = setting(
        20 * MB, "Largest request body; larger gets 413 without being read into memory."
    )
    request_timeout_ms: float = setting(
        30000.0,
        "Deadline per request, counting queue time; expired requests get 504 before inference. 0: none.",
    )
    drain_grace_s: float = setting(
        30.0, "On SIGTERM: /readyz turns 503 at once; how long the process may take to finish before exit."
    )
    log_level: str = setting("info", "Logging level.", choices=("debug", "info", "warning", "error"))

    def check(self) -> list[str]:
        """Problems that make these settings unusable, as messages (empty: fine)."""
        problems = []
        if self.max_body_bytes <= 0:
            problems.append("max_body_bytes must be > 0")
        for name in ("request_timeout_ms", "drain_grace_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not 0 <= self.port < 65536:
            problems.append("port must be in 0..65535 (0: any free port)")
        return problems
