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
    env = env_name("cascade")
    parser.add_argument(
        "--cascade",
        nargs=2,
        metavar=("FAST_DIR", "QUALITY_DIR"),
        default=[part.strip() for part in os.environ[env].split(",")] if os.environ.get(env) else None,
        help="Score a cascade of two models instead of one: the fast model answers, the quality model "
        f"where the fast one's signal says so; per threshold [env {env}: FAST_DIR,QUALITY_DIR].",
    )


def run(args: argparse.Namespace) -> int:
    settings = from_args(EvalSettings, args)
    exit_on_problems("eval", settings.check() + _cascade_problems(settings, args.cascade))
    if args.cascade:
        return _run_cascade(settings, args)
    from captionfleet.evalsets import DatasetError
    from captionfleet.runtime.engine.errors import EngineError
    from captionfleet.runtime.training.evaluate import format_table, score_model

    with exit_on("eval", DatasetError, EngineError):
        report = score_model(settings)
    print(report.to_json() if args.json else format_table(report), file=sys.stdout)
    return 0


def _cascade_problems(settings: EvalSettings, cascade: list[str] | None) -> list[str]:
    if cascade is not None and len(cascade) != 2:
        return [f"--cascade needs FAST_DIR and QUALITY_DIR (env {env_name('cascade')}: two, comma-separated)"]
    if cascade is None and settings.cascade_options_given():
        return ["--threshold, --target-escalation-rate, --signal and --write-calibration need --cascade"]
    return []


def _run_cascade(settings: EvalSettings, args: argparse.Namespace) -> int:
    from captionfleet.evalsets import DatasetError
    from captionfleet.runtime.engine.errors import EngineError
    from captionfleet.runtime.training.cascade import CascadeError, format_cascade, run_cascade

    with exit_on("eval", DatasetError, EngineError, CascadeError):
        report = run_cascade(settings, *args.cascade)
    print(report.to_json() if args.json else format_cascade(report), file=sys.stdout)
    return 0
