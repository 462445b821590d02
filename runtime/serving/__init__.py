"""The async data plane: dynamic batching, the result cache, orchestration.

It knows nothing of HTTP: it raises domain errors (``serving.errors`` and the engine's) and one module
of the server maps them to statuses. API keys and body limits are the HTTP edge's (``runtime/web``).
"""
