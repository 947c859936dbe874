"""The ``polytope`` command: one sub-command per module in :mod:`polytope.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from polytope.model.errors import PolytopeError

#: Sub-command modules; each has ``add_parser(subparsers)`` setting ``handler=run(args) -> int``.
COMMANDS = (
    "polytope.commands.certify",
    "polytope.commands.data",
    "polytope.commands.radius",
    "polytope.commands.reproduce",
    "polytope.commands.supports",
    "polytope.commands.tightness",
    "polytope.commands.train",
    "polytope.commands.verify",
)
#: Commands run often and alone (a VNN-LIB solver is started once per query): only their module is
#: imported, so start-up does not pay for the others' imports.
LIGHT = ("supports", "verify")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (and exit status 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered (their parsers are :class:`OneLineParser` too);
    ``only``: just that one (see :data:`LIGHT`)."""
    parser = OneLineParser(
        prog="polytope",
        description="Provable robustness of ReLU networks by linear programming (Wong & Kolter 2018).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (f"polytope.commands.{only}",):
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn polytope's errors into one line on stderr (exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in LIGHT else None).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PolytopeError as exc:
        print(f"polytope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"polytope {args.command}: interrupted", file=sys.stderr)
        return 130
