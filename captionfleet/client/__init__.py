"""``captionfleet caption``: the client for many images, against a router or a runtime.

A handful of images (``direct_max_images``) are captioned by ``POST /v1/caption`` calls, a bounded
number at once; more become jobs (``POST /v1/jobs``), polled with a progress bar, whose results are
written in input order as JSON Lines. A run that is interrupted resumes from the state file next to
its output (``<output>.state.json``), or from a job id (``--resume``). Only the HTTP API and the
shared names: no runtime, no operator.
"""
