"""The router: the fleet's public endpoint, a weighted and sticky traffic splitter over model versions.

It speaks the runtime's HTTP API, picks a version per request from a routing table (``table``), proxies
to one of that version's live endpoints (``proxy``; which one, and which are ejected as outliers and
probed until they are back: ``balancer``) and counts per-version figures for Prometheus and for
the operator's rollout analysis (``stats``). The table comes from the CaptionModel's status through the
Kubernetes API (``watch``) or from static options and files (``sources``). It never imports torch, the
engine or the server: the router process stays light.
"""
