"""The ``rmgl`` command. Each module of this package adds its subcommands with
``register(subparsers)`` and stores the handler as ``func`` on the parsed namespace; the
library modules know nothing of the command line.

User errors (a bad path, a bad config value, an unreadable file, a run that diverged) are
printed as one line, ``rmgl <command>: error: ...``, with exit code 1; ``-v`` adds the
traceback. Anything else is a bug in rmgl and keeps its traceback.

Building the parser imports neither torch nor numpy (each handler imports what it needs), so
``rmgl --help`` and ``rmgl CMD --help`` answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings

import rmgl
from rmgl.cli import (
    data,
    deploy,
    evaluate,
    inspect,
    model,
    report,
    search,
    serve,
    track,
    trackers,
    train,
)
from rmgl.cli.overrides import apply_deprecated_set, apply_renamed_options

# Modules that add subcommands, in the order they appear in ``rmgl --help``.
COMMAND_MODULES = [
    data,
    model,
    train,
    evaluate,
    inspect,
    report,
    deploy,
    trackers,
    search,
    serve,
    track,
]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input was wrong", not "rmgl is broken"."""
    from rmgl.data.loading import UnreadableImageError
    from rmgl.engine.trainer import TrainingDiverged

    return (OSError, ValueError, UnreadableImageError, TrainingDiverged)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it or there
    is none to show (a flag, an option that is off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text.lower() or not shows_default(action):
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})".strip()


def shows_default(action: argparse.Action) -> bool:
    """An option with a value to show: not a flag, not off-unless-given, not a positional."""
    default = action.default
    return (
        bool(action.option_strings)
        and default is not None
        and default is not False
        and default is not argparse.SUPPRESS
        and default != []
        and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmgl",
        description="Receptive multi-granularity learning for person re-ID: train, evaluate, "
        "report, export and search. 'rmgl COMMAND --help' describes a command; the manual is "
        "in docs/README.md.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"rmgl {rmgl.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    for sub in all_parsers(parser):
        sub.formatter_class = HelpFormatter
        for action in sub._actions:
            if action.help is None and shows_default(action):
                action.help = ""  # argparse skips an option without help: give it one
                action.help = HelpFormatter(sub.prog)._get_help_string(action)
    return parser


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += all_parsers(sub)
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options: `train CFG --resume optim.epochs=80`
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    apply_deprecated_set(args, argv)
    apply_renamed_options(args, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    warnings.showwarning = _show_warning
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"rmgl {args.command}: interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        if args.verbose:
            traceback.print_exc()
        lines = user_message(err).splitlines()
        print(f"rmgl {args.command}: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:  # multi-line explanations (which tensors do not fit) stay readable
            print(f"  {line.strip()}", file=sys.stderr)
        return 1


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Deprecations (FutureWarning: a config value under a former name) as one line that
    says what to write instead; other warnings as Python shows them."""
    if issubclass(category, FutureWarning):
        print(f"rmgl: warning: {message}", file=file or sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def user_message(err: BaseException) -> str:
    """The error's own words. An error raised in a DataLoader worker arrives wrapped, as
    "Caught X in DataLoader worker process N. Original Traceback ..."; its last line is the
    message that was raised."""
    text = str(err).strip() or type(err).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    if (
        isinstance(err, OSError)
        and err.filename
        and err.strerror
        and str(err.filename) not in err.strerror
    ):
        return f"{err.strerror}: {err.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())
