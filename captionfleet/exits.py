"""How a command that cannot start says why: one line ``captionfleet <command>: <what>`` and exit 1.

For settings that do not hold together (``settings.check()``) and for the errors a command expects from
its work (a model that does not load, an output folder that is not empty): no traceback for those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


def exit_on_problems(command: str, problems: Sequence[str]) -> None:
    """Exit with every problem on one line, if there is any."""
    if problems:
        raise SystemExit(f"captionfleet {command}: " + "; ".join(problems))


@contextlib.contextmanager
def exit_on(command: str, *expected: type[Exception]) -> Iterator[None]:
    """Turn the ``expected`` errors of the block into an exit with their message."""
    try:
        yield
    except expected as exc:
        raise SystemExit(f"captionfleet {command}: {exc}") from None
