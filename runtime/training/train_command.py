"""``captionfleet train``: build the bundled caption model from nothing but a seed."""

from __future__ import annotations

import argparse
import sys

from captionfleet.exits import exit_on, exit_on_problems
from captionfleet.runtime.training.settings import TrainSettings
from captionfleet.settings import add_options, from_args

HELP = "Train the bundled caption model (a tiny BLIP) on synthetic scenes, repeatably from a seed."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TrainSettings)


def run(args: argparse.Namespace) -> int:
    settings = from_args(TrainSettings, args)
    exit_on_problems("train", settings.check())
    from captionfleet.runtime.training.bundle import OutputDirError
    from captionfleet.runtime.training.pipeline import train_and_save

    with exit_on("train", OutputDirError):
        outcome = train_and_save(settings)
    print(outcome.summary(), file=sys.stdout)
    return 0
