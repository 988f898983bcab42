"""One override syntax for every command: positional ``key=value`` arguments
(``rmgl train market1501 optim.epochs=80``, ``rmgl sweep a.yaml b.yaml optim.epochs=2``,
``rmgl synth --out d occlusion.prob=0.5``). The older ``--set a=1 b=2`` and
``--set a=1 --set b=2`` spellings still work for now, with a warning that shows the new form."""

from __future__ import annotations

import argparse
import sys

SET_FLAG = "--set"


def add_overrides(parser: argparse.ArgumentParser, help: str, positional: bool = True) -> None:
    """Positional ``key=value`` overrides (``overrides``) and the deprecated ``--set``.
    ``positional=False`` when another positional takes a variable number of values
    (``rmgl sweep``): the handler then separates ``key=value`` items itself."""
    if positional:
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help)
    else:
        parser.set_defaults(overrides=[])
    parser.add_argument(
        SET_FLAG,
        nargs="+",
        action="extend",
        default=[],
        dest="deprecated_set",
        metavar="KEY=VALUE",
        help=argparse.SUPPRESS,  # deprecated: accepted with a warning, not offered
    )


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``["a.yaml", "optim.epochs=2"]`` -> (``["a.yaml"]``, ``["optim.epochs=2"]``): an item
    with ``=`` is an override (a config name never has one)."""
    names = [item for item in items if "=" not in item]
    return names, [item for item in items if "=" in item]


def apply_deprecated_set(args: argparse.Namespace, argv: list[str]) -> None:
    """Move ``--set`` values into ``args.overrides``, warning with the command in the new form."""
    values = getattr(args, "deprecated_set", None)
    if not values:
        return
    args.overrides = [*getattr(args, "overrides", []), *values]
    print(
        f"rmgl {args.command}: warning: --set is deprecated and will be removed; give "
        f"overrides as KEY=VALUE arguments: {new_form(argv)}",
        file=sys.stderr,
    )


def new_form(argv: list[str]) -> str:
    """``rmgl sweep a --set x=1 y=2`` -> ``rmgl sweep a x=1 y=2``."""
    kept, moved, in_set = [], [], False
    for token in argv:
        if token == SET_FLAG:
            in_set = True
        elif token.startswith(SET_FLAG + "="):
            moved.append(token[len(SET_FLAG) + 1 :])
            in_set = True
        elif in_set and not token.startswith("-") and "=" in token:
            moved.append(token)
        else:
            in_set = False
            kept.append(token)
    return " ".join(["rmgl", *kept, *moved])
