"""API keys, per-key rate limits, and a limit on failed key attempts per client address.

Keys are held only as SHA-256 digests and compared in constant time (``hmac.compare_digest`` against
every known digest, with no early exit), so neither memory dumps nor response timings reveal them. A
key file may hold ``sha256:<hex>`` lines instead of keys, so it need not contain secrets at all; in
the file ``#`` starts a comment, while keys given as settings are taken whole (a key may contain ``#``).

A client that keeps presenting wrong keys is guessing: :class:`KeyGuard` gives each client address a
token bucket of failed attempts (``auth_failure_burst`` in a row, then ``auth_failure_rps``), and
answers 429 with ``Retry-After`` once it is empty, whatever key comes next, so guessing is slow.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from captionfleet.runtime.web.errors import RateLimited, Unauthorized
from captionfleet.settings.edge import EdgeSettings

HASHED_PREFIX = "sha256:"


def digest(key: str) -> bytes:
    # surrogateescape: a header that is not UTF-8 arrives with its bytes escaped; they are still bytes.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_key_lines(lines: Iterable[str], origin: str, *, comments: bool = True) -> list[bytes]:
    """Digests of the keys in ``lines``: blank lines skipped, ``sha256:<hex>`` kept; with ``comments``
    (a keys file), ``#`` starts a comment."""
    digests = []
    for number, raw in enumerate(lines, start=1):
        line = (raw.split("#", 1)[0] if comments else raw).strip()
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
        digests = parse_key_lines(keys, "api_keys", comments=False)
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
    """A token bucket per id (a key id, a client address): ``rate`` tokens a second, at most ``burst``
    saved up. At most ``max_ids`` buckets are kept: the least recently used one goes first (it is, or
    soon will be, full again), so many distinct ids cannot grow memory without bound."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic, max_ids: int = 100_000
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_ids = max_ids
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key_id: str, cost: int = 1) -> None:
        """Take ``cost`` tokens from the key's bucket or raise :class:`RateLimited` with a retry time."""
        if not self.enabled:
            return
        bucket = self._refilled(key_id)
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

    def empty(self, key_id: str) -> bool:
        """Whether the id's bucket holds less than one token now (without taking any)."""
        return self.enabled and self._refilled(key_id).tokens < 1

    def _refilled(self, key_id: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.pop(key_id, None)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=now)
            while len(self._buckets) >= self.max_ids:
                self._buckets.popitem(last=False)
        self._buckets[key_id] = bucket  # most recently used last
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        return bucket


class KeyGuard:
    """API keys with a limit on failed attempts per client address."""

    def __init__(self, keys: ApiKeys, failures: RateLimiter) -> None:
        self.keys = keys
        self.failures = failures

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> KeyGuard:
        keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)
        return cls(keys, RateLimiter(settings.auth_failure_rps, settings.auth_failure_burst))

    def authenticate(self, presented: str | None, client: str | None) -> str:
        """The key's id, or raise :class:`Unauthorized`, or :class:`RateLimited` for a client whose failed
        attempts used up its bucket (the key is not even checked then: guessing stays slow)."""
        if self.keys.open:
            return "anonymous"
        client_id = client or "unknown"
        if self.failures.empty(client_id):
            self._refuse(client_id)
        try:
            return self.keys.authenticate(presented)
        except Unauthorized:
            self._refuse(client_id)
            raise

    def _refuse(self, client_id: str) -> None:
        try:
            self.failures.acquire(client_id)
        except RateLimited as exc:
            raise RateLimited(
                "too many failed API key attempts from this address", retry_after=exc.retry_after
            ) from None
