"""``captionfleet bench``: the side-by-side benchmarks (see the package docstring and issue 7).

Cheap to import: the benchmarks, torch and the servers load inside :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from captionfleet.bench.settings import BenchSettings
from captionfleet.settings import add_options, env_name, from_args

HELP = "Benchmark captionfleet side by side against the alternatives (preprocessing, serving, cache, router)."

_TRUE = {"1", "true", "yes", "on"}


def _flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    env = env_name(name)
    default = os.environ.get(env, "").strip().lower() in _TRUE
    parser.add_argument(f"--{name}", action="store_true", default=default, help=f"{help_text} [env {env}]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Prints a table, or with --json one JSON object. `make bench BENCH_ARGS=--quick` runs the quick "
        "version. The GPU script is separate: python -m captionfleet.bench.gpu --help."
    )
    _flag(parser, "quick", "Fewer requests, 1 and 32 clients, the served model only: under 3 min on 2 cores.")
    _flag(parser, "json", "Print one JSON object (the headline keys first) instead of the table.")
    add_options(parser, BenchSettings)


def run(args: argparse.Namespace) -> int:
    settings = from_args(BenchSettings, args)
    if args.quick:
        settings = settings.quick()
    problems = settings.check()
    if problems:
        print("captionfleet bench: " + "; ".join(problems), file=sys.stderr)
        return 2

    import asyncio

    from captionfleet.bench.report import to_json, to_table
    from captionfleet.bench.suite import run_suite
    from captionfleet.runtime.engine.errors import ModelLoadError

    try:
        results = asyncio.run(run_suite(settings, quick=args.quick))
    except ModelLoadError as exc:
        print(f"captionfleet bench: {exc} (or pass --model DIR)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(results), indent=2))
    else:
        print(to_table(results))
    return 0
