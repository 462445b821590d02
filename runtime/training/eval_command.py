"""``captionfleet eval``: score a BLIP model on held-out synthetic scenes or a COCO-style image folder."""

from __future__ import annotations

import argparse
import os
import sys

from captionfleet.exits import exit_on, exit_on_problems
from captionfleet.runtime.training.settings import EvalSettings
from captionfleet.settings import add_options, env_name, from_args

HELP = (
    "Score a BLIP caption model (exact match, BLEU-4, CIDEr, images/s) on held-out synthetic scenes "
    "or on an image folder with COCO-style captions."
)

_TRUE = {"1", "true", "yes", "on"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EvalSettings)
    env = env_name("json")
    parser.add_argument(
        "--json",
        action="store_true",
        default=os.environ.get(env, "").strip().lower() in _TRUE,
        help=f"Print one JSON object instead of a table [env {env}].",
    )


def run(args: argparse.Namespace) -> int:
    settings = from_args(EvalSettings, args)
    exit_on_problems("eval", settings.check())
    from captionfleet.evalsets import DatasetError
    from captionfleet.runtime.engine.errors import EngineError
    from captionfleet.runtime.training.evaluate import format_table, score_model

    with exit_on("eval", DatasetError, EngineError):
        report = score_model(settings)
    print(report.to_json() if args.json else format_table(report), file=sys.stdout)
    return 0
