"""The runtime's HTTP layer on the shared edge (``runtime/web``): routes and handlers, request parsing,
URL fetching, the table of domain errors, metrics, OpenAPI, start and drain, and ``captionfleet serve``."""
