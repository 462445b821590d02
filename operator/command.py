"""``captionfleet operator``: run the kopf operator that reconciles CaptionModels."""

from __future__ import annotations

import argparse

from captionfleet.settings import add_options, from_args

HELP = "Run the operator: reconcile CaptionModel resources into captioning fleets (kopf)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from captionfleet.operator.settings import OperatorSettings

    add_options(parser, OperatorSettings)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from captionfleet.exits import exit_on
    from captionfleet.operator.operator_key import OperatorKeyError
    from captionfleet.operator.runner import run_operator
    from captionfleet.operator.settings import OperatorSettings

    settings = from_args(OperatorSettings, args)
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with exit_on("operator", OperatorKeyError):  # raised at startup, before kopf runs
        asyncio.run(run_operator(settings))
    return 0
