"""``captionfleet bench``: side-by-side benchmarks of captionfleet against what users would pick instead.

Each benchmark measures ours and the alternative in the same run on the same machine and reports the
ratio, because shared machines are noisy: preprocessing (ours vs ``BlipImageProcessor``), serving
(``captionfleet serve`` vs a naive one-request-at-a-time server), the cache-hit path and the router hop.
``captionfleet.bench.gpu`` is a standalone GPU script (torch and transformers only).
"""
