"""The ``rmgl`` command.

Each area of the package contributes its subcommands through a module that exposes
``register(subparsers)``; the handler is stored as ``func`` on the parsed namespace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that add subcommands, in the order they appear in ``rmgl --help``.
COMMAND_MODULES = [
    "rmgl.data.commands",  # synth, data-info
    "rmgl.model.commands",  # rf
    "rmgl.engine.commands",  # train, eval, demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmgl", description="Receptive multi-granularity learning for person re-ID."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        # User errors (bad root, bad layout, bad option) are reported without a traceback.
        print(f"rmgl {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
