"""The ``captionfleet`` command: one entry point, one subcommand per component.

Each subcommand lives in the component that owns it and is imported only when chosen, so that
``captionfleet operator`` never imports torch. A subcommand module exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``, and must be cheap to import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from captionfleet.version import __version__

SUBCOMMANDS: dict[str, str] = {
    "serve": "captionfleet.runtime.server.command",
    "router": "captionfleet.runtime.router.command",
    "operator": "captionfleet.operator.command",
    "train": "captionfleet.runtime.training.train_command",
    "eval": "captionfleet.runtime.training.eval_command",
    "bench": "captionfleet.bench.command",
    "caption": "captionfleet.client.command",
}


def _available() -> dict[str, str]:
    """The subcommands whose module is installed: the operator image's distribution
    (``captionfleet-operator``) has no runtime and no benchmarks, so it offers ``operator`` alone."""
    found = {}
    for name, module in SUBCOMMANDS.items():
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # its parent package is not in this build
            spec = None
        if spec is not None:
            found[name] = module
    return found


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captionfleet",
        description="Run image-captioning fleets on Kubernetes: the runtime, the router and the operator.",
    )
    parser.add_argument("--version", action="version", version=f"captionfleet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in _available().items():
        if only is not None and name != only:
            # Other subcommands are listed but not imported: their modules may be heavier.
            subparsers.add_parser(name, help=f"see `captionfleet {name} --help`")
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    module = getattr(args, "_module", None)
    if module is None:
        parser.error(f"unknown command {args.command!r}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
