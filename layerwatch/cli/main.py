"""The ``layerwatch`` command: ``demo``, ``trajectory`` and ``report``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``; only the
module of the subcommand being run is imported (none for ``layerwatch --help``), so the command starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from layerwatch._version import __version__

SUBCOMMANDS = {
    "demo": ("layerwatch.cli.demo", "train a small GPT-2 on CPU with layerwatch watching (about 3 minutes on 2 idle cores)"),
    "trajectory": ("layerwatch.cli.trajectory", "probe saved checkpoints and write them as one run"),
    "report": ("layerwatch.cli.report", "draw a run as PNG pictures and an HTML page, or compare runs"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``layerwatch`` parser; only ``command``'s module is imported to add its arguments (none for ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="layerwatch",
        description="Watch every layer's representations evolve while a language model trains.",
    )
    parser.add_argument("--version", action="version", version=f"layerwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if name == command:
            _add_arguments(sub, module_name)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: the first argument that is not an option (the top level has no values)."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def _add_arguments(sub: argparse.ArgumentParser, module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # a subcommand with a missing optional dependency says so when it is run
        sub.set_defaults(_import_error=str(error))
        sub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    module.add_arguments(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_import_error", None):
        print(f"layerwatch {args.command}: {args._import_error}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
