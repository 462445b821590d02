"""The client's own deadline, ``X-Request-Timeout-Ms``: read the same way by the router and the server.

The router forwards what is left of its budget in this header, so a runtime's queue time counts against
the client's deadline; a client may send it too. It can only shorten a process's own timeout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from captionfleet.names import TIMEOUT_HEADER
from captionfleet.runtime.web.errors import InvalidRequest

_NUMBER = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def client_timeout_ms(headers: Mapping[str, str]) -> float | None:
    """The header's milliseconds, or None when absent; anything but a positive finite number -> 400."""
    given = headers.get(TIMEOUT_HEADER)
    if given is None:
        return None
    # ASCII digits only: float() also takes "٣٠٠٠", "1_000", "infinity" and other scripts' digits.
    client_ms = float(given) if _NUMBER.fullmatch(given.strip()) else math.nan
    if not 0 < client_ms < math.inf:
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} must be a positive number of milliseconds", code="invalid_timeout"
        )
    return client_ms
