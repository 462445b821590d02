"""The captioning engine: image decoding, preprocessing and batch captioning with BLIP.

Synchronous and free of HTTP: the async data plane (``serving``) and the HTTP server (``server``) sit
above it, and ``training`` uses it to score models.
"""
