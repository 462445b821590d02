"""API keys and per-key rate limits.

Keys are held only as SHA-256 digests and compared in constant time (``hmac.compare_digest`` against
every known digest, with no early exit), so neither memory dumps nor response timings reveal them. A
key file may hold ``sha256:<hex>`` lines instead of keys, so it need not contain secrets at all.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from captionfleet.runtime.serving.errors import RateLimited, Unauthorized

HASHED_PREFIX = "sha256:"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_key_lines(lines: Iterable[str], origin: str) -> list[bytes]:
    """Digests of the keys in ``lines``: blank lines and ``#`` comments skipped, ``sha256:<hex>`` kept."""
    digests = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(HASHED_PREFIX):
            hex_digest = line[len(HASHED_PREFIX) :].strip().lower()
            try:
                value = bytes.fromhex(hex_digest)
            except ValueError:
                value = b""
            if len(value) != 32:
                raise ValueError(f"{origin}:{number}: {HASHED_PREFIX} must be followed by 64 hex digits")
            digests.append(value)
        else:
            digests.append(digest(line))
    return digests


class ApiKeys:
    """The configured keys; :meth:`authenticate` returns a stable, non-secret id of the key used."""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self._digests = list(dict.fromkeys(digests))

    @classmethod
    def load(cls, keys: Iterable[str] = (), keys_file: str = "") -> ApiKeys:
        digests = parse_key_lines(keys, "api_keys")
        if keys_file:
            path = Path(keys_file)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read the API keys file {path}: {exc}") from exc
            digests.extend(parse_key_lines(text.splitlines(), str(path)))
        return cls(digests)

    @property
    def open(self) -> bool:
        """No keys configured: every request is let in."""
        return not self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, presented: str | None) -> str:
        """The key's id (first 12 hex of its digest), or raise :class:`Unauthorized`.

        With no keys configured, returns ``"anonymous"``.
        """
        if self.open:
            return "anonymous"
        if not presented:
            raise Unauthorized("this server needs an API key in the X-API-Key header")
        candidate = digest(presented)
        matched = b""
        for known in self._digests:  # all of them, always: the time taken does not depend on which matched
            if hmac.compare_digest(candidate, known):
                matched = known
        if not matched:
            raise Unauthorized("the API key is not valid")
        return matched.hex()[:12]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key id: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key_id: str, cost: int = 1) -> None:
        """Take ``cost`` tokens from the key's bucket or raise :class:`RateLimited` with a retry time."""
        if not self.enabled:
            return
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if cost > self.burst:
            raise RateLimited(
                f"this request costs {cost} tokens but the bucket holds at most {self.burst}",
                retry_after=math.ceil(cost / self.rate),
            )
        if bucket.tokens < cost:
            wait = (cost - bucket.tokens) / self.rate
            raise RateLimited(
                f"rate limit of {self.rate:g} requests/s exceeded", retry_after=max(1, math.ceil(wait))
            )
        bucket.tokens -= cost
