"""``captionfleet caption``: many images in, their captions out as JSON Lines (see ``run.py``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from captionfleet.settings import add_options, from_args

HELP = "Caption many images (files, folders, urls.txt) through a fleet: a job, a progress bar, JSON Lines."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from captionfleet.client.settings import CaptionSettings

    parser.add_argument(
        "images",
        nargs="*",
        metavar="PATH|DIR|URLS.txt|URL",
        help="Image files, folders of images (recursively), text files of image URLs (one a line), or URLs.",
    )
    add_options(parser, CaptionSettings)


def run(args: argparse.Namespace) -> int:
    """0: every image captioned; 1: some have an error line; 2: nothing written (bad input, an API
    error: a job already accepted is resumed by the same command); 130: interrupted (likewise)."""
    from captionfleet.client.api import ApiError
    from captionfleet.client.inputs import InputError, collect
    from captionfleet.client.run import run as caption
    from captionfleet.client.settings import CaptionSettings

    settings = from_args(CaptionSettings, args)
    problems = settings.check()
    if not args.images and not settings.resume:
        problems.append("give images (PATH, DIR, urls.txt or URL), or --resume JOB_ID")
    if problems:
        print("captionfleet caption: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        items = collect(args.images) if not settings.resume else []
        summary = asyncio.run(caption(settings, items))
    except (InputError, ApiError, ValueError, OSError) as exc:
        print(f"captionfleet caption: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captionfleet caption: interrupted; the same command resumes the run", file=sys.stderr)
        return 130
    jobs = f" (jobs {', '.join(summary.jobs)})" if summary.jobs else ""
    print(f"{summary.done} captioned, {summary.failed} failed -> {settings.output}{jobs}", file=sys.stderr)
    return 1 if summary.failed else 0
