"""``polytope reproduce NAME [ARGS...]``: run one of the paper's experiments (``experiments/``).

Each experiment writes ``figures/<name>.png`` and ``figures/<name>.csv``; ``main`` runs the
project's main job on the embedded default (Figures 6, 3 and 7, no downloads).
Extra arguments go to the experiment (try ``polytope reproduce NAME --help``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import experiments
from polytope.commands.common import help_text


def available() -> list[str]:
    """Experiment modules that define ``main(argv)``."""
    names = []
    for info in pkgutil.iter_modules(experiments.__path__):
        if not info.name.startswith("_"):
            names.append(info.name)
    return sorted(names)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``reproduce``."""
    parser = subparsers.add_parser(
        "reproduce", help="reproduce a figure or table of the paper", description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=available(), help="the experiment")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the experiment")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Import ``experiments.<name>`` and call its ``main`` with the remaining arguments."""
    module = importlib.import_module(f"experiments.{args.name}")
    return int(module.main(args.args) or 0)
