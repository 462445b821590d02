"""What the runtime server and the router share at the HTTP edge: JSON logs and the JSON error body.

Both processes speak the same public API (../shared/CONTRACT.md), so both log and answer errors the
same way; each keeps its own table of which domain error is which status.
"""
