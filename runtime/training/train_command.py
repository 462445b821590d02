"""``captionfleet train``: build the bundled caption model from nothing but a seed."""

from __future__ import annotations

import argparse
import sys

from captionfleet.runtime.training.settings import TrainSettings
from captionfleet.settings import add_options, from_args

HELP = "Train the bundled caption model (a tiny BLIP) on synthetic scenes, repeatably from a seed."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TrainSettings)


def run(args: argparse.Namespace) -> int:
    settings = from_args(TrainSettings, args)
    problems = settings.check()
    if problems:
        raise SystemExit("captionfleet train: " + "; ".join(problems))
    from captionfleet.runtime.training.bundle import OutputDirError
    from captionfleet.runtime.training.pipeline import train_and_save

    try:
        outcome = train_and_save(settings)
    except OutputDirError as exc:
        raise SystemExit(f"captionfleet train: {exc}") from None
    print(outcome.summary(), file=sys.stdout)
    return 0
