"""``polytope data``: fetch datasets and show which are installed.

    polytope data fetch NAME [--data-dir DIR]
    polytope data info [--data-dir DIR]

:func:`add_parser` registers the sub-command and sets ``handler=run`` on the parsed
arguments; :func:`run` returns the process exit code (0 success, 1 failure).
"""

from __future__ import annotations

import argparse
import sys

from polytope.io import data
from polytope.model.errors import PolytopeError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` (with actions ``fetch`` and ``info``) on a CLI's sub-parsers."""
    parser = subparsers.add_parser("data", help="fetch datasets and list what is installed")
    actions = parser.add_subparsers(dest="data_action", required=True, metavar="ACTION")
    fetch = actions.add_parser("fetch", help="download a dataset and verify its checksums")
    fetch.add_argument("name", choices=data.DATASETS, help="dataset to fetch")
    info = actions.add_parser("info", help="which datasets are present, and their sizes")
    for sub in (fetch, info):
        sub.add_argument(
            "--data-dir",
            default=None,
            help=f"data directory (default: ${data.ENV_DATA_DIR}, ../shared/data, ~/.polytope/data)",
        )
        sub.set_defaults(handler=run)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``polytope data ACTION``; errors print one clear message to stderr and return 1."""
    try:
        if args.data_action == "fetch":
            return _fetch(args.name, args.data_dir)
        return _info(args.data_dir)
    except PolytopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _fetch(name: str, data_dir: str | None) -> int:
    dest = data.fetch(name, data_dir)
    print(f"{name}: ready in {dest}" if data.RESOURCES[name] else f"{name}: bundled with scikit-learn")
    return 0


def _size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _info(data_dir: str | None) -> int:
    print(f"data directory: {data.data_dir(data_dir)}")
    for name in data.DATASETS:
        info = data.dataset_info(name, data_dir)
        counts = ", ".join(f"{split} {n}" for split, n in info.examples.items())
        state = "present" if info.present else "missing"
        print(f"{name:<14} {state:<8} {counts:<24} {_size(info.total_bytes) if info.files else ''}".rstrip())
        for path, n_bytes in info.files:
            print(f"    {path}  ({_size(n_bytes)})")
        if info.problem:
            print("    " + info.problem.replace("\n", "\n    "))
    return 0
