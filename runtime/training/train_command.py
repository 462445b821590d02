"""``captionfleet train``: build the bundled caption model from nothing but a seed."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from captionfleet.exits import exit_on, exit_on_problems
from captionfleet.runtime.training.settings import DEFAULT_PRESET, TRAIN_PRESETS, TrainSettings
from captionfleet.settings import add_options, env_name

HELP = "Train a bundled caption model (a small BLIP) on synthetic scenes, repeatably from a seed."

_UNSET = object()
"""The parsed value of an option given neither on the command line nor in the environment."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = env_name("preset")
    parser.add_argument(
        "--preset",
        default=os.environ.get(env, DEFAULT_PRESET),
        metavar="PRESET",
        help=f"Named defaults of every option below ({', '.join(TRAIN_PRESETS)}); the defaults shown "
        f"are the {DEFAULT_PRESET!r} preset's [env {env}; default: {DEFAULT_PRESET!r}].",
    )
    add_options(parser, TrainSettings)
    # An option left alone takes the preset's value, so the parser must tell it from one given.
    unset = [f.name for f in dataclasses.fields(TrainSettings) if env_name(f.name) not in os.environ]
    parser.set_defaults(**dict.fromkeys(unset, _UNSET))


def settings_from(args: argparse.Namespace) -> tuple[TrainSettings | None, list[str]]:
    """The preset's settings with the options given; or None and why not."""
    preset = TRAIN_PRESETS.get(args.preset)
    if preset is None:
        return None, [f"--preset must be one of {', '.join(TRAIN_PRESETS)}, got {args.preset!r}"]
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainSettings)
        if getattr(args, f.name, _UNSET) is not _UNSET
    }
    settings = dataclasses.replace(preset, **given)
    return settings, settings.check()


def run(args: argparse.Namespace) -> int:
    settings, problems = settings_from(args)
    exit_on_problems("train", problems)
    assert settings is not None
    from captionfleet.runtime.training.bundle import OutputDirError
    from captionfleet.runtime.training.pipeline import train_and_save

    with exit_on("train", OutputDirError):
        outcome = train_and_save(settings)
    print(outcome.summary(), file=sys.stdout)
    return 0
