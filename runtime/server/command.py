"""``captionfleet serve``: serve one caption model over HTTP (see CONTRACT.md for the API)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from captionfleet.exits import exit_on_problems
from captionfleet.settings import add_options, from_args
from captionfleet.settings.serve import ServeSettings

HELP = "Serve a BLIP caption model over HTTP with dynamic batching, a result cache, API keys and metrics."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ServeSettings)


def run(args: argparse.Namespace) -> int:
    settings = from_args(ServeSettings, args)
    from captionfleet.runtime.engine.options import STYLES

    problems = settings.check()
    if settings.style and settings.style.strip().lower() not in STYLES:
        problems.append(f"style {settings.style!r} is not one of {', '.join(sorted(STYLES))}")
    if not problems:
        problems += _moderation_url_problems(settings)
    exit_on_problems("serve", problems)

    from captionfleet.runtime.server.lifecycle import serve_until_signalled
    from captionfleet.runtime.web.logs import configure_logging

    configure_logging(settings.log_level)
    import torch

    from captionfleet.runtime.engine.cpus import usable_cpus

    torch.set_num_threads(settings.torch_threads or usable_cpus())
    logging.getLogger("captionfleet.runtime.server").info(
        "starting captionfleet serve", extra={"settings": _public(settings)}
    )
    return asyncio.run(serve_until_signalled(settings))


def _moderation_url_problems(settings: ServeSettings) -> list[str]:
    from captionfleet.runtime.server.moderation import moderation_client
    from captionfleet.runtime.web.errors import UrlRefused

    try:
        moderation_client(settings)
    except (UrlRefused, ValueError) as exc:
        return [f"moderation_url may not be used: {exc}"]
    return []


def _public(settings: ServeSettings) -> dict[str, object]:
    """The settings fit for a log line: no keys, no passwords in the Redis or moderation URL."""
    from dataclasses import asdict

    from captionfleet.runtime.serving.repeats import redact_url

    shown = asdict(settings)
    shown["api_keys"] = f"<{len(settings.api_keys)} keys>"
    shown["redis_url"] = redact_url(settings.redis_url) if settings.redis_url else ""
    shown["moderation_url"] = redact_url(settings.moderation_url) if settings.moderation_url else ""
    return shown
