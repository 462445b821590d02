"""The HTTP layer of the runtime: aiohttp app, request parsing, URL fetching, error mapping, metrics,
OpenAPI, drain, and the ``captionfleet serve`` command."""
