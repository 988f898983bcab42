"""One override syntax for every command: positional ``key=value`` arguments
(``rmgl train market1501 optim.epochs=80``, ``rmgl sweep a.yaml b.yaml optim.epochs=2``,
``rmgl synth --out d occlusion.prob=0.5``). The older ``--set a=1 b=2`` and
``--set a=1 --set b=2`` spellings still work for now, with a warning that shows the new form;
so do options that became config keys (``rmgl eval --dataset D --root R``, now
``data.dataset=D data.root=R``)."""

from __future__ import annotations

import argparse
import shlex
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


def add_renamed_option(parser: argparse.ArgumentParser, flag: str, key: str) -> None:
    """Accept the former option ``flag VALUE`` as ``key=VALUE`` for a deprecation period
    (hidden from ``--help``; :func:`apply_renamed_options` warns with the new form)."""
    dest = "renamed_" + flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, dest=dest, metavar="VALUE", help=argparse.SUPPRESS)
    renamed = dict(parser.get_default("renamed_options") or {})
    renamed[flag] = (dest, key)
    parser.set_defaults(renamed_options=renamed)


def apply_renamed_options(args: argparse.Namespace, argv: list[str]) -> None:
    """Move the values of renamed options into ``args.overrides`` (before the ``key=value``
    arguments, so that these win), warning once with the command in the new form."""
    renamed = getattr(args, "renamed_options", None) or {}
    given = {flag: getattr(args, dest) for flag, (dest, _) in renamed.items()}
    given = {flag: value for flag, value in given.items() if value is not None}
    if not given:
        return
    moved = [f"{renamed[flag][1]}={value}" for flag, value in given.items()]
    args.overrides = [*moved, *getattr(args, "overrides", [])]
    flags = " and ".join(given)
    print(
        f"rmgl {args.command}: warning: {flags} {'are' if len(given) > 1 else 'is'} deprecated "
        f"and will be removed; give {'them' if len(given) > 1 else 'it'} as KEY=VALUE "
        f"arguments: {new_form(argv, {flag: key for flag, (_, key) in renamed.items()})}",
        file=sys.stderr,
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


def new_form(argv: list[str], renamed: dict[str, str] | None = None) -> str:
    """``rmgl sweep a --set x=1 y=2`` -> ``rmgl sweep a x=1 y=2``; with ``renamed``
    ``{"--root": "data.root"}``, ``--root R`` (or ``--root=R``) -> ``data.root=R`` in place."""
    renamed = renamed or {}
    kept, moved, in_set = [], [], False
    tokens = iter(argv)
    for token in tokens:
        flag, equals, value = token.partition("=")
        if flag in renamed:
            value = value if equals else next(tokens, "")
            kept.append(f"{renamed[flag]}={value}")
            in_set = False
        elif token == SET_FLAG:
            in_set = True
        elif token.startswith(SET_FLAG + "="):
            moved.append(token[len(SET_FLAG) + 1 :])
            in_set = True
        elif in_set and not token.startswith("-") and "=" in token:
            moved.append(token)
        else:
            in_set = False
            kept.append(token)
    return " ".join(["rmgl", *map(shlex.quote, [*kept, *moved])])
