"""The async data plane: dynamic batching, the result cache, API keys and rate limits, orchestration.

It knows nothing of HTTP: it raises domain errors (``serving.errors`` and the engine's) and one module
of the server maps them to statuses.
"""
