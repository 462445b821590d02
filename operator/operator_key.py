"""The operator's own API key per CaptionModel: how the quality gate gets past ``spec.auth``.

With ``spec.auth`` every runtime refuses a request without one of the user's keys, and the operator
must not read the user's Secret to find one (least privilege: it has no RBAC on Secrets). So the
operator holds one master secret of its own (``--operator-key-file``, mounted from a Secret the chart
makes) and derives one key per CaptionModel: ``HMAC-SHA256(master, "<namespace>/<name>")`` in hex.
Only that key's ``sha256:<hex>`` digest leaves the operator: the builders add it to the runtimes'
``api_keys`` (a digest is not a secret, so it may sit in a Deployment), next to the user's keys file.
The gate sends the key itself in ``X-API-Key``, straight to the version's pods.

Why derived keys and not the master itself: a key read from one fleet's pods (their memory) opens no
other fleet; and why not in the router: the key is for the operator's calls to the pods, never a way
in through the fleet's public endpoint. The key is never logged, stored in status, an Event or a
manifest; this module's objects do not show it in their ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

HASHED_PREFIX = "sha256:"  # what the runtime's keys accept instead of a key (runtime/web/keys.py)
MIN_MASTER_CHARS = 32


class OperatorKeyError(ValueError):
    """The master key file cannot be used (unreadable, empty, too short)."""


@dataclass(frozen=True)
class OperatorKey:
    """The master secret; derives each CaptionModel's key and its digest."""

    master: bytes = field(repr=False)

    @classmethod
    def load(cls, path: str) -> OperatorKey | None:
        """The key in the file at ``path`` (surrounding whitespace stripped); None without a path."""
        if not path:
            return None
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise OperatorKeyError(f"cannot read the operator key file {path}: {exc}") from exc
        if len(text) < MIN_MASTER_CHARS:
            raise OperatorKeyError(
                f"the operator key file {path} holds {len(text)} characters; at least "
                f"{MIN_MASTER_CHARS} are needed (e.g. `openssl rand -hex 32`)"
            )
        return cls(text.encode("utf-8"))

    def key_for(self, namespace: str, name: str) -> str:
        """The API key of CaptionModel ``namespace/name`` (64 hex digits)."""
        return hmac.new(self.master, f"{namespace}/{name}".encode(), hashlib.sha256).hexdigest()

    def digest_for(self, namespace: str, name: str) -> str:
        """``sha256:<hex>`` of that key: what the runtimes are given, never the key."""
        return HASHED_PREFIX + hashlib.sha256(self.key_for(namespace, name).encode()).hexdigest()
