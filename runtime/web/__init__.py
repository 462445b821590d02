"""The HTTP edge that ``captionfleet serve`` and ``captionfleet router`` share.

Both processes speak the same public API (../shared/CONTRACT.md) and face the same clients, so one
package holds what stands between a socket and a handler: the connection (``protocol``: JSON answers
for what aiohttp's parser refuses, a deadline for a request's headers), listening and draining
(``listener``), the middleware (``middleware``: request id, deadline, body budget, JSON errors, 499,
access log) and what it records on each request (``context``), bounded body reading (``body``), API
keys and failed-attempt limits (``keys``), the error classes and the JSON error body (``errors``), the
probes (``probes``), the Prometheus registry (``metrics``), JSON logs (``logs``) and the client's
deadline header (``timeouts``). Each process passes its own table of domain errors and its metrics.
"""
